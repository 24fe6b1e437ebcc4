"""The latency model (musco_std.latency): cache keys and reuse, candidate grids, speed-aware rounding.

Every test but one uses a fake, deterministic timer: no test asserts a wall-clock time.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_std.latency import (
    LatencyModel,
    candidate_ranks,
    fastest_rank_near,
)
from musco_core.stats import LayerStats


class FakeTimer:
    """Seconds = parameter count * 1e-9 + 1e-6 per module call; records every call."""

    def __init__(self, table=None):
        self.calls = []
        self.table = table

    def __call__(self, module, x):
        self.calls.append((type(module).__name__, tuple(x.shape), x.dtype, module.training))
        if self.table is not None:
            return self.table(module)
        return sum(p.numel() for p in module.parameters()) * 1e-9 + 1e-6


def test_time_module_uses_the_timer_in_eval_mode_on_the_input_shape():
    timer = FakeTimer()
    model = LatencyModel(timer=timer, warmup=0)
    conv = nn.Conv2d(3, 8, 3).train()
    seconds = model.time_module(conv, (2, 3, 16, 16))
    assert seconds == pytest.approx((8 * 3 * 9 + 8) * 1e-9 + 1e-6)
    assert timer.calls == [("Conv2d", (2, 3, 16, 16), torch.float32, False)]
    assert conv.training  # the caller's module is left as it was


def test_identical_layers_are_timed_once_and_different_ones_are_not():
    timer = FakeTimer()
    model = LatencyModel(timer=timer, warmup=0)
    a, b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
    model.time_module(a, (1, 16, 8, 8))
    model.time_module(b, (1, 16, 8, 8))  # same structure, other weights: a hit
    assert (model.hits, model.misses, len(timer.calls)) == (1, 1, 1)
    for other in [nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.Conv2d(16, 16, 3, padding=2,
                  dilation=2), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Conv2d(16, 24, 3, padding=1)]:
        model.time_module(other, (1, 16, 8, 8))
    model.time_module(a, (2, 16, 8, 8))  # another input shape
    assert model.misses == 7 and len(set(model.cache)) == 7


def test_the_key_names_shape_device_dtype_format_and_threads():
    conv = nn.Conv2d(4, 4, 1)
    key = LatencyModel(threads=3).key(conv, (1, 4, 5, 5))
    assert key.startswith("Conv2d:")
    assert key.endswith("|in=1x4x5x5|cpu|float32|contiguous|threads=3")
    keys = {LatencyModel(threads=1).key(conv, (1, 4, 5, 5)),
            LatencyModel(threads=2).key(conv, (1, 4, 5, 5)),
            LatencyModel(threads=1, dtype=torch.bfloat16).key(conv, (1, 4, 5, 5)),
            LatencyModel(threads=1, memory_format=torch.channels_last).key(conv, (1, 4, 5, 5))}
    assert len(keys) == 4


def test_a_factorized_layers_key_carries_its_rank():
    svd = musco.default_registry().get("decompositions", "svd").strategy
    model = LatencyModel(timer=FakeTimer(), warmup=0)
    conv = nn.Conv2d(32, 32, 1)
    keys = {model.key(svd.skeleton(conv, r), (1, 32, 4, 4)) for r in (8, 16, 16)}
    assert len(keys) == 2


def test_dtype_and_memory_format_are_applied_to_module_and_input():
    seen = {}

    def timer(module, x):
        seen.update(dtype=module.weight.dtype, x=x.dtype,
                    cl=x.is_contiguous(memory_format=torch.channels_last),
                    wcl=module.weight.is_contiguous(memory_format=torch.channels_last))
        return 1.0

    LatencyModel(dtype=torch.bfloat16, memory_format=torch.channels_last, timer=timer,
                 warmup=1).time_module(nn.Conv2d(8, 8, 3), (1, 8, 6, 6))
    assert seen == {"dtype": torch.bfloat16, "x": torch.bfloat16, "cl": True, "wcl": True}


def test_speedup_returns_both_times():
    model = LatencyModel(timer=FakeTimer(), warmup=0)
    old, new = nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 64))
    t_old, t_new = model.speedup(old, new, (4, 64))
    assert t_old > t_new > 0


def test_save_and_load_reuse_the_cache(tmp_path):
    timer = FakeTimer()
    model = LatencyModel(timer=timer, warmup=0, threads=1)
    conv = nn.Conv2d(8, 8, 3)
    t = model.time_module(conv, (1, 8, 8, 8))
    path = tmp_path / "latency.json"
    model.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "musco-latency" and len(data["entries"]) == 1
    again = LatencyModel.load(path, timer=FakeTimer(), warmup=0, threads=1)
    assert again.time_module(nn.Conv2d(8, 8, 3), (1, 8, 8, 8)) == t
    assert (again.hits, again.misses) == (1, 0)
    with pytest.raises(ValueError, match="not a musco latency cache"):
        path.write_text("{}")
        LatencyModel.load(path)


def test_bad_arguments_say_what_is_valid():
    with pytest.raises(ValueError, match="memory format"):
        LatencyModel(memory_format=torch.preserve_format)
    with pytest.raises(ValueError, match="threads"):
        LatencyModel(threads=0)
    with pytest.raises(ValueError, match="finite"):
        LatencyModel(timer=lambda m, x: float("nan"), warmup=0).time_module(nn.Linear(2, 2), (1, 2))


def test_the_real_timer_measures_something(one_thread):
    """The default Timer path runs (no value is asserted beyond being positive)."""
    model = LatencyModel(min_run_time=0.001, warmup=1, threads=1)
    assert model.time_module(nn.Linear(8, 8), (2, 8)) > 0


@pytest.mark.parametrize("full, rank, multiple, span, expected", [
    (256, 100, 8, 2, [88, 96, 100, 104, 112]),
    (256, 96, 8, 1, [96]),
    (256, 96, 16, 2, [80, 96, 112]),
    (100, 99, 8, 2, [88, 96, 99]),  # 104 is above the full rank
    (64, 3, 8, 2, [3, 8, 16]),
])
def test_candidate_ranks_grid(full, rank, multiple, span, expected):
    assert candidate_ranks(full, rank, multiple, span) == expected


def test_candidate_ranks_of_tuple_ranks_keep_their_shape():
    assert candidate_ranks((128, 128), (100, 60), 8, 2) == [
        (88, 48), (96, 56), (100, 60), (104, 64), (112, 72)]
    with pytest.raises(ValueError, match="differ in length"):
        candidate_ranks((8, 8), (4, 4, 4))


def _stats(shape):
    return LayerStats(shape, shape, 0, 0, 1)


def test_fastest_rank_near_rounds_to_the_fast_kernel_when_it_pays():
    svd = musco.default_registry().get("decompositions", "svd").strategy
    layer = nn.Linear(256, 256)

    def table(module):  # a ragged rank (100) runs slow kernels; multiples of 8 are fast
        if isinstance(module, nn.Linear):
            return 10.0
        rank = module.rank
        return rank * 0.01 * (2.0 if rank % 8 else 1.0)

    model = LatencyModel(timer=FakeTimer(table), warmup=0)
    cost = {96: 0.11, 100: 0.10, 104: 0.095}
    chosen = fastest_rank_near(svd, layer, _stats((1, 256)), 100, model, cost.__getitem__)
    assert [c.rank for c in chosen.candidates] == [96, 100, 104]
    # 96: 10.4x speed at cost 0.11 (score 94.7); 104: 9.6x at 0.095 (score 101): up wins
    assert chosen.rank == 104
    assert chosen.speedup() == pytest.approx(10.0 / 1.04)
    # a steeper accuracy cost above makes rounding down win
    steep = {96: 0.10, 100: 0.10, 104: 0.10}
    assert fastest_rank_near(svd, layer, _stats((1, 256)), 100, model,
                             steep.__getitem__).rank == 96
    # max_cost drops candidates that spend too much accuracy
    assert fastest_rank_near(svd, layer, _stats((1, 256)), 100, model, cost.__getitem__,
                             max_cost=0.1).rank == 104


def test_latency_doc_code_blocks_run(one_thread):
    """docs/latency.md's python blocks run in order, as tests/test_docs.py runs the guides."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "latency.md"
    namespace: dict = {"__name__": "__docs__"}
    for kind, code in re.findall(r"```(\w+)\n(.*?)```", page.read_text(), re.S):
        if kind == "python":
            exec(compile(code, str(page), "exec"), namespace)


def test_batch_times_every_layer_and_the_model_at_that_batch():
    timer = FakeTimer()
    model = LatencyModel(timer=timer, warmup=0, batch=16)
    conv = nn.Conv2d(3, 8, 3)
    model.time_module(conv, (2, 3, 16, 16))
    assert timer.calls == [("Conv2d", (16, 3, 16, 16), torch.float32, False)]
    assert "|in=16x3x16x16|" in model.key(conv, (2, 3, 16, 16))
    seen = []

    class TwoInputs(nn.Module):
        def forward(self, x, mask, scale):
            seen.append((tuple(x.shape), tuple(mask.shape), tuple(scale.shape)))
            return x * mask

    x, mask = torch.arange(6.0).reshape(3, 2), torch.ones(3, 2)
    LatencyModel(timer=timer, warmup=1, batch=16).time_model(TwoInputs(),
                                                             (x, mask, torch.ones(2)))
    assert seen == [((16, 2), (16, 2), (2,))]  # the batch dim repeated; the (2,) tensor kept
    from musco_std.latency import rebatch

    out = rebatch({"x": x}, 5)["x"]
    assert torch.equal(out, x[[0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match=r"batch must be an int >= 1 or None, got 0"):
        LatencyModel(batch=0)


class SequenceTimer:
    """Returns the next of ``values`` for each measurement of a module with that many params."""

    def __init__(self, values):
        self.values = {k: list(v) for k, v in values.items()}

    def __call__(self, module, x):
        return self.values[sum(p.numel() for p in module.parameters())].pop(0)


def test_min_speedup_near_the_margin_is_decided_on_the_median_of_three():
    from musco_std.svd import SVD

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32)).eval()
    new_params = sum(p.numel() for p in SVD().compress(net[0], 4, None)[0].parameters())
    old_params = sum(p.numel() for p in net.parameters())
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=4),
                                        min_speedup=1.05)])

    def run(old_times, new_times):
        timer = SequenceTimer({old_params: old_times, new_params: new_times})
        latency = LatencyModel(timer=timer, warmup=0)
        report = musco.Compressor(net, spec, torch.randn(2, 32), latency=latency).step()
        return report.layers[0], timer

    # first measurement 1.10x (looks fine) but the two re-timings say 0.9x: skipped
    layer, timer = run([1.10, 1.0, 1.0], [1.0, 1.2, 1.1])
    assert layer.status == "skipped" and (layer.time_before, layer.time_after) == (1.0, 1.1)
    assert timer.values == {old_params: [], new_params: []}  # three measurements each
    # first measurement 1.02x (looks slower) but the re-timings agree on 1.2x: kept
    layer, _ = run([1.02, 1.2, 1.2], [1.0, 1.0, 1.0])
    assert layer.status == "compressed" and layer.time_before / layer.time_after == 1.2
    # far from the margin: one measurement decides
    layer, timer = run([3.0, 9.9], [1.0, 9.9])
    assert layer.status == "compressed" and timer.values == {old_params: [9.9],
                                                              new_params: [9.9]}


def test_round_by_speed_in_a_rule_rounds_to_the_fast_rank_and_reports_the_timing():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(64, 64))

    def net_with(spectrum):
        layer = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            layer.weight.copy_(u @ torch.diag(spectrum) @ v.T)
        return nn.Sequential(layer).eval()

    # 24 strong directions, then noise: rank 24 costs almost nothing, 16 a third
    net = net_with(torch.cat([torch.ones(24), torch.full((40,), 0.01)]))

    def table(module):  # ranks that are multiples of 8 run twice as fast
        if isinstance(module, nn.Linear):
            return 1.0
        rank = module.rank
        return rank * 0.01 * (2.0 if rank % 8 else 1.0)

    def run(net=net, **rule):
        spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                            rank=musco.RankRule("fixed", rank=21), **rule)])
        latency = LatencyModel(timer=FakeTimer(table), warmup=0)
        compressor = musco.Compressor(net, spec, torch.randn(2, 64), latency=latency)
        preview = compressor.preview()[0]
        return preview, compressor.step().layers[0]

    _, plain = run()
    assert plain.rank == 21 and plain.time_before is None
    preview, rounded = run(round_by_speed=8)
    # speedups: 16 -> 6.25x, 21 -> 2.4x, 24 -> 4.2x; discarded energy: 16 -> 1/3, 24 -> ~0
    assert preview.rank == rounded.rank == 24  # rounds *up*: speed and accuracy both gain
    assert (rounded.time_before, rounded.time_after) == (1.0, pytest.approx(0.24))
    # a flat spectrum: 16 discards 75% of the energy, 24 62.5%; 16 is 1.5x faster: down
    _, flat = run(net_with(torch.ones(64)), round_by_speed=8)
    assert flat.rank == 16 and flat.time_after == pytest.approx(0.16)
    # min_rank still holds after the rounding, and the clamped rank is what gets timed
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=21, min_rank=20),
                                        round_by_speed=8)])
    clamped = musco.Compressor(net_with(torch.ones(64)), spec, torch.randn(2, 64),
                               latency=LatencyModel(timer=FakeTimer(table), warmup=0)).step()
    assert clamped.layers[0].rank == 20
    assert clamped.layers[0].time_after == pytest.approx(0.40)

    with pytest.raises(musco.SpecError, match=r"give 'round_to' or the 'round_by_speed' gate, not both"):
        musco.Compressor(net, musco.Spec(rules=[musco.Rule(
            match="linear", decomposition="svd",
            rank=musco.RankRule("fixed", rank=21, round_to=8), round_by_speed=8)]),
            torch.randn(2, 64))
    with pytest.raises(musco.SpecError, match=r"'round_by_speed' gate does not apply to the joint"):
        musco.Compressor(net, musco.Spec(rules=[musco.Rule(
            match="linear", decomposition="svd",
            rank=musco.RankRule("budget", flop_reduction=2.0), round_by_speed=8)]),
            torch.randn(2, 64))
    spec = musco.Spec.from_dict({"rules": [{"match": "linear", "decomposition": "svd",
                                            "rank": "vbmf", "round_by_speed": 16}]})
    assert spec.rules[0].gates == (musco.Gate("round_by_speed", multiple=16),)
    assert musco.Spec.from_dict(spec.to_dict()) == spec
