"""Deterministic engine runs, written as JSON, to compare two versions of musco bit for bit.

Four runs with no wall-clock budget anywhere (plain multi-round svd/tucker2 with vbmf;
whitened svd/tucker2 with energy / flop_reduction and layer-output refinement; budget
with tucker2; budget with whitened svd, scope = "model", and model-output refinement),
each on a small CNN with an in-place ReLU and four seeded calibration batches. Every step
report (minus its seconds), the manifest and the summed absolute weights are written.

    python docs/benchmarks/engine_equivalence.py after.json
    PYTHONPATH=/path/to/old/checkout:/path/to/old/checkout/plugins \
        python docs/benchmarks/engine_equivalence.py before.json
    cmp before.json after.json

The script speaks both spec forms (``Refine(scope=...)`` before the policy kinds,
``Refine("layer_output", ...)`` after). Results: docs/benchmarks/results/engine_equivalence.md.
"""
import sys, warnings, json, torch
from torch import nn
warnings.simplefilter("ignore")
import musco_core as m
torch.manual_seed(0)
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 32, 1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4, 10))
data = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
new = hasattr(m, "Gate")
def refine(scope, steps):
    return m.Refine(f"{scope}_output", steps=steps, lr=1e-3) if new else m.Refine(steps=steps, lr=1e-3, scope=scope)
specs = {
 "plain": m.Spec(rules=[m.Rule(match=["conv1x1", "linear"], decomposition="svd", rank=m.RankRule("param_reduction", rate=2.0)),
                        m.Rule(match="conv_kxk", decomposition="tucker2", rank=m.RankRule("vbmf"))], layers_per_step=2, rounds=2),
 "whiten+layer refine": m.Spec(rules=[m.Rule(match=["conv1x1", "linear"], decomposition=m.Decompose("svd", whiten=True), rank=m.RankRule("energy", fraction=0.9)),
                        m.Rule(match="conv_kxk", decomposition=m.Decompose("tucker2", whiten=True), rank=m.RankRule("flop_reduction", rate=2.0))], layers_per_step=2, refine=refine("layer", 20)),
 "budget+model refine": m.Spec(rules=[m.Rule(match=["conv1x1", "linear", "conv_kxk"], decomposition=m.Decompose("svd", whiten=True) if False else "tucker2" , rank=m.RankRule("budget", flop_reduction=1.5, grid=3))], layers_per_step=1),
 "budget svd whiten model refine": m.Spec(rules=[m.Rule(match=["conv1x1", "linear"], decomposition=m.Decompose("svd", whiten=True), rank=m.RankRule("budget", flop_reduction=1.03, grid=3, scope="model"))], layers_per_step=1, refine=refine("model", 15)),
}
out = {}
for name, spec in specs.items():
    c = m.Compressor(net(), spec, data[0], calibration=None if name == "plain" else data, progress=False)
    reps = []
    while not c.done:
        r = c.step().to_dict()
        for l in r["layers"]: l.pop("seconds", None)
        r.pop("seconds", None)
        reps.append(r)
    out[name] = {"reports": reps, "manifest": c.manifest, "weights": sum(float(v.double().abs().sum()) for v in c.model.state_dict().values())}
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
print("ok", {k: len(v["reports"]) for k, v in out.items()})
