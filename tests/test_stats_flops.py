"""Honest FLOPs: recurrent layers FlopCounterMode misses, and the share a spec addresses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.flop_counter import FlopCounterMode

from musco_core import default_registry
from musco_core.plan import candidate_layers
from musco_core.stats import FlopCounter as _Counter
from musco_core.stats import collect_stats as _collect
from musco_core.coverage import coverage
from musco_core.stats import probe_module as _probe
from musco_std.flop_formulas import attention_flops, recurrent_flops

#: The registered FLOP formulas (first-party: RNNs and attention, musco_std.flop_formulas),
#: as the engine hands them to the counter.
FORMULAS = default_registry().flop_formulas()


def FlopCounter(model):  # noqa: N802 - the counter with the registered formulas
    return _Counter(model, FORMULAS)


def collect_stats(model, inputs, names):
    return _collect(model, inputs, names, FORMULAS)


def probe_module(module, shape):
    return _probe(module, shape, FORMULAS)

pytestmark = pytest.mark.usefixtures("one_thread")


def counter_flops(module: nn.Module, x) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops())


def test_lstm_hand_count():
    # LSTM(8 -> 16), 5 steps x batch 3: per step 4 gates x 16 x (8 inputs + 16 hidden)
    # multiply-adds = 1536, i.e. 3072 FLOPs; x 15 steps = 46080. FlopCounterMode says 0.
    lstm = nn.LSTM(8, 16)
    x = torch.randn(5, 3, 8)
    assert counter_flops(lstm, x) == 0
    assert recurrent_flops(lstm, (5, 3, 8)) == 46080
    assert probe_module(lstm, (5, 3, 8))[0] == 46080


def test_lstm_hand_count_bidirectional_two_layers_proj():
    # LSTM(6 -> h=4, proj 3, 2 layers, bidirectional), batch-first (2, 7, 6): 14 steps.
    # layer 0, per direction and step: 2*4*4*(6+3) + 2*4*3 = 288 + 24 = 312
    # layer 1 reads both directions' outputs (2*3 = 6): the same 312
    # total = 14 steps * 2 directions * (312 + 312) = 17472
    lstm = nn.LSTM(6, 4, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    assert recurrent_flops(lstm, (2, 7, 6)) == 17472
    assert probe_module(lstm, (2, 7, 6))[0] == 17472


@pytest.mark.parametrize("module", [
    nn.GRU(8, 16), nn.GRU(5, 3, num_layers=3, bidirectional=True), nn.RNN(4, 6, num_layers=2),
    nn.RNN(4, 6, nonlinearity="relu", bidirectional=True, batch_first=True),
], ids=["gru", "gru_3layers_bi", "rnn_2layers", "rnn_relu_bi"])
def test_formula_equals_flop_counter_where_it_counts(module):
    x = torch.randn(4, 3, module.input_size)
    assert counter_flops(module, x) == recurrent_flops(module, tuple(x.shape)) > 0
    assert probe_module(module, tuple(x.shape))[0] == counter_flops(module, x)  # not added twice


def test_packed_and_unbatched_inputs_count_real_steps():
    lstm = nn.LSTM(8, 16)
    packed = pack_padded_sequence(torch.randn(5, 3, 8), torch.tensor([5, 4, 2]))
    with FlopCounter(lstm) as counter, torch.no_grad():
        lstm(packed)
    assert counter.total() == 11 * 3072  # 5 + 4 + 2 steps
    assert recurrent_flops(lstm, (5, 8)) == 5 * 3072


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_formula_equals_the_slow_path_count(batch_first):
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first, kdim=12, vdim=10)
    q, k, v = (torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 10))
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    counter = FlopCounterMode(display=False)
    with counter:  # training mode: the unfused path, which the counter sees
        mha(q, k, v)
    assert counter.get_total_flops() == attention_flops(mha, tuple(q.shape), tuple(k.shape))


def test_fast_path_attention_is_counted_by_formula():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        mha(x, x, x)
    assert counter.get_total_flops() == 0
    with FlopCounter(mha) as ours, torch.no_grad():
        mha(query=x, key=x, value=x)
    assert ours.total() == attention_flops(mha, (2, 5, 16), (2, 5, 16)) == 23680


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens):
        y, _ = self.lstm(self.embed(tokens))
        y = self.norm(y)
        y = self.attn(y, y, y, need_weights=False)[0]
        return self.head(y)


def test_collect_stats_counts_lstm_in_place_and_coverage():
    model = Tagger()
    tokens = torch.randint(0, 50, (2, 5))
    layers = candidate_layers(model)
    stats = collect_stats(model, tokens, layers)
    assert stats["lstm"].flops == recurrent_flops(model.lstm, (2, 5, 8)) == 10 * 3072
    assert stats["head"].flops == 2 * 10 * 16 * 5
    # eval mode: attention takes PyTorch's fused fast path, which FlopCounterMode counts as 0
    assert stats["attn"].flops == attention_flops(model.attn, (2, 5, 16), (2, 5, 16)) > 0
    with FlopCounter(model) as counter, torch.no_grad():
        model.eval()(tokens)
    total = counter.total()

    cov = coverage(stats, ["head", "lstm", "attn.out_proj"], model)
    outer = ["attn", "embed", "head", "lstm", "norm"]
    assert cov["flops_total"] == sum(stats[n].flops for n in outer) == total
    assert cov["flops_planned"] == stats["head"].flops + stats["lstm"].flops
    assert cov["params_total"] == sum(p.numel() for p in model.parameters())
    assert cov["params_planned"] == 16 * 5 + 5 + 1664
    assert 0 < cov["flops_share"] < 1 and 0 < cov["params_share"] < 1
    assert [n for n, _, _ in cov["not_planned"]] == ["attn", "embed", "norm"]  # by FLOPs, then params
    assert cov["zero_flops"] == ["embed", "norm"]
    # MultiheadAttention uses out_proj's weight directly: the Linear never runs as a module
    assert cov["not_run"] == ["attn.out_proj"]

    everything = coverage(stats, outer, model, total_flops=total)
    assert everything["flops_share"] == 1.0 and everything["params_share"] == 1.0
    assert everything["not_planned"] == []


class Block(nn.Module):
    """Holds a parameter of its own and runs a Linear: both are measured layers."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * self.scale


def test_nested_layers_are_counted_once():
    model = nn.Sequential(Block(), nn.Linear(8, 2))
    stats = collect_stats(model, torch.randn(3, 8), candidate_layers(model))
    assert set(stats) == {"0", "0.fc", "1"}
    cov = coverage(stats, ["0", "0.fc"], model)
    assert cov["flops_total"] == stats["0"].flops + stats["1"].flops
    assert cov["flops_planned"] == stats["0"].flops == stats["0.fc"].flops
    assert cov["params_planned"] == 8 + 72
    assert [n for n, _, _ in cov["not_planned"]] == ["1"]


def test_without_the_lstm_formula_the_share_would_be_overstated():
    model = Tagger()
    tokens = torch.randint(0, 50, (2, 5))
    stats = collect_stats(model, tokens, candidate_layers(model))
    honest = coverage(stats, ["head", "attn"], model)["flops_share"]
    naive = (stats["head"].flops + stats["attn"].flops) / (
        sum(s.flops for n, s in stats.items() if "." not in n) - stats["lstm"].flops)
    assert honest < naive == 1.0
