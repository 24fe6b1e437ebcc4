"""Conv1d (svd1d, tucker2_1d), GPT-2 Conv1D (svd_hf_conv1d), LSTM/GRU/RNN (svd_rnn), grouped convs."""

from __future__ import annotations

import copy
import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import musco_core as musco
from musco_core import RankRule, Rule, Spec, UnsupportedLayerError
from musco_core.testing import (
    DEFAULT_LAYERS,
    check_compress_keeps_input,
    check_decomposition,
    check_flop_count,
    check_param_count,
    check_planted_recovery,
    check_rank_for_param_count,
    check_validate_rank,
)
from musco_std.conv1d import SVD1d, SVDConv1d, Tucker21d, Tucker2Conv1d
from musco_std.hf_conv1d import SVDHFConv1D, is_hf_conv1d
from musco_std.recurrent import LowRankInputGRU, LowRankInputLSTM, SVDRecurrent
from musco_std.routing import Routed
from musco_std.svd import SVD, SVDLinear
from musco_std.tucker2 import Tucker2

pytestmark = pytest.mark.usefixtures("one_thread")

#: The kit checks that need no dense reference forward (the kit's reference is conv2d/linear).
KIT_CHECKS = (check_validate_rank, check_param_count, check_flop_count,
              check_compress_keeps_input, check_rank_for_param_count)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# -- layer configurations the kit can build ------------------------------------------------


@attrs.frozen
class Conv1dConfig:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int | str = 0
    dilation: int = 1
    padding_mode: str = "zeros"
    bias: bool = True
    length: int = 9
    batch: int = 2
    groups: int = 1

    def module(self, *, seed: int = 0, dtype=torch.float64) -> nn.Conv1d:
        torch.manual_seed(seed)
        return nn.Conv1d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, groups=self.groups, bias=self.bias,
                         padding_mode=self.padding_mode, dtype=dtype)

    def input(self, *, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, self.in_channels, self.length, generator=g, dtype=dtype)


CONV1D_LAYERS = {
    "k1": Conv1dConfig(6, 8, 1),
    "k1_stride_pad_nobias": Conv1dConfig(7, 5, 1, stride=2, padding=1, bias=False),
    "k1_reflect": Conv1dConfig(5, 6, 1, padding=2, padding_mode="reflect"),
    "k3_pad": Conv1dConfig(5, 7, 3, padding=1),
    "k5_stride_dilation_nobias": Conv1dConfig(4, 6, 5, stride=2, dilation=2, bias=False,
                                              length=16),
    "k4_same": Conv1dConfig(6, 5, 4, padding="same"),
    "k3_circular": Conv1dConfig(4, 5, 3, padding=1, padding_mode="circular"),
}


class Conv1D(nn.Module):
    """A stand-in for ``transformers.pytorch_utils.Conv1D`` (same code, no transformers import)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


@attrs.frozen
class HFConfig:
    nx: int
    nf: int

    def module(self, *, seed: int = 0, dtype=torch.float64) -> Conv1D:
        torch.manual_seed(seed)
        m = Conv1D(self.nf, self.nx).to(dtype)
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
        return m

    def input(self, *, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
        return torch.randn(2, 3, self.nx, generator=torch.Generator().manual_seed(seed), dtype=dtype)


HF_LAYERS = {"wide": HFConfig(12, 5), "tall": HFConfig(4, 9), "square": HFConfig(6, 6)}


@attrs.frozen
class RNNConfig:
    kind: type
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    proj_size: int = 0
    bias: bool = True

    def module(self, *, seed: int = 0, dtype=torch.float64) -> nn.RNNBase:
        torch.manual_seed(seed)
        kw = {"proj_size": self.proj_size} if self.proj_size else {}
        return self.kind(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                         batch_first=self.batch_first, bidirectional=self.bidirectional,
                         dtype=dtype, **kw)

    def input(self, *, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
        shape = (2, 5, self.input_size) if self.batch_first else (5, 2, self.input_size)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


RNN_LAYERS = {
    "lstm": RNNConfig(nn.LSTM, 12, 4),
    "lstm_bi_2layers_batch_first": RNNConfig(nn.LSTM, 10, 3, num_layers=2, bidirectional=True,
                                             batch_first=True),
    "lstm_proj": RNNConfig(nn.LSTM, 9, 5, proj_size=2),
    "gru_bi": RNNConfig(nn.GRU, 11, 3, bidirectional=True),
    "gru_2layers_nobias": RNNConfig(nn.GRU, 8, 3, num_layers=2, bias=False),
    "rnn": RNNConfig(nn.RNN, 7, 2),
}


# -- conformance kit ----------------------------------------------------------------------


@pytest.mark.parametrize("check", KIT_CHECKS + (check_planted_recovery,), ids=lambda c: c.__name__)
@pytest.mark.parametrize("decomposition", [SVD1d(), Tucker21d()], ids=lambda d: d.name)
def test_conv1d_kit(decomposition, check):
    check(decomposition, layers=CONV1D_LAYERS)


@pytest.mark.parametrize("check", KIT_CHECKS, ids=lambda c: c.__name__)
def test_hf_conv1d_kit(check):
    check(SVDHFConv1D(), layers=HF_LAYERS)


def test_hf_conv1d_kit_planted_square():
    # The kit plants through module.weight.shape, which is (in, out) here: square layers only.
    check_planted_recovery(SVDHFConv1D(), layers={"square": HF_LAYERS["square"]})


@pytest.mark.parametrize("check", KIT_CHECKS, ids=lambda c: c.__name__)
def test_recurrent_kit(check):
    check(SVDRecurrent(), layers=RNN_LAYERS)


def test_decompositions_accept_some_kit_layer_and_none_of_the_defaults():
    for decomposition in (SVD1d(), Tucker21d(), SVDHFConv1D(), SVDRecurrent()):
        for name, config in DEFAULT_LAYERS.items():
            with pytest.raises(UnsupportedLayerError):
                decomposition.check(name, config.module())


# -- equivalence at full rank and planted-rank recovery -------------------------------------


def _compressed_matches(decomposition, config, rank, tol=1e-10):
    module = config.module()
    built, error = decomposition.compress(module, rank, decomposition.Params())
    x = config.input()
    with torch.no_grad():
        got, want = built(x), module(x)
    got = got[0] if isinstance(got, tuple) else got
    want = want[0] if isinstance(want, tuple) else want
    assert got.shape == want.shape
    return rel(got, want), error, built


@pytest.mark.parametrize("name", list(CONV1D_LAYERS))
def test_conv1d_full_rank_is_exact(name):
    config = CONV1D_LAYERS[name]
    decomposition = SVD1d() if config.kernel_size == 1 else Tucker21d()
    full = decomposition.full_rank(config.module())
    diff, error, built = _compressed_matches(decomposition, config, full)
    assert diff < 1e-10 and error < 1e-10
    assert isinstance(built, SVDConv1d if config.kernel_size == 1 else Tucker2Conv1d)


@settings(max_examples=15)
@given(cin=st.integers(2, 6), cout=st.integers(2, 6), k=st.integers(2, 4),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), padding=st.integers(0, 2),
       bias=st.booleans(), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       seed=st.integers(0, 2**16))
def test_tucker2_1d_planted_rank_is_recovered(cin, cout, k, stride, dilation, padding, bias, mode,
                                              seed):
    if mode == "reflect":
        padding = min(padding, 1)
    config = Conv1dConfig(cin, cout, k, stride=stride, dilation=dilation, padding=padding,
                          padding_mode=mode, bias=bias, length=12)
    module = config.module(seed=seed)
    decomposition = Tucker21d()
    rank = (max(1, cin // 2), max(1, cout // 2))
    planted, _ = decomposition.compress(module, rank, decomposition.Params())
    with torch.no_grad():  # a conv whose weight is exactly of Tucker rank `rank`
        module.weight.copy_(decomposition.weight(planted).reshape(module.weight.shape))
    built, error = decomposition.compress(module, rank, decomposition.Params())
    assert error < 1e-8
    x = config.input()
    with torch.no_grad():
        assert rel(built(x), module(x)) < 1e-8


@settings(max_examples=15)
@given(cin=st.integers(1, 8), cout=st.integers(1, 8), seed=st.integers(0, 2**16),
       rank=st.integers(1, 8))
def test_svd1d_planted_rank_is_recovered(cin, cout, seed, rank):
    rank = min(rank, cin, cout)
    g = torch.Generator().manual_seed(seed)
    module = Conv1dConfig(cin, cout, 1).module(seed=seed)
    with torch.no_grad():
        module.weight.copy_((torch.randn(cout, rank, generator=g, dtype=torch.float64)
                             @ torch.randn(rank, cin, generator=g, dtype=torch.float64))[..., None])
    built, error = SVD1d().compress(module, rank, None)
    assert error < 1e-10 and built.rank == rank


def test_conv1d_recompression_round_two():
    for decomposition, config, rank in ((SVD1d(), CONV1D_LAYERS["k1_reflect"], 3),
                                        (Tucker21d(), CONV1D_LAYERS["k4_same"], (3, 3))):
        module = config.module()
        built, _ = decomposition.compress(module, rank, decomposition.Params())
        decomposition.check("layer", built)
        small = 2 if isinstance(rank, int) else (2, 1)
        again, error = decomposition.compress(built, small, decomposition.Params())
        assert 0 < error < 1 and type(again) is type(built)
        ref = copy.deepcopy(module)
        with torch.no_grad():
            ref.weight.copy_(decomposition.weight(again).reshape(ref.weight.shape))
            x = config.input()
            assert rel(again(x), ref(x)) < 1e-10


def test_hf_conv1d_full_rank_and_planted_recovery():
    decomposition = SVDHFConv1D()
    for config in HF_LAYERS.values():
        module = config.module()
        assert is_hf_conv1d(module)
        diff, error, built = _compressed_matches(decomposition, config, decomposition.full_rank(module))
        assert diff < 1e-10 and isinstance(built, SVDLinear)
        planted = copy.deepcopy(module)
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            planted.weight.copy_(torch.randn(config.nx, 2, generator=g, dtype=torch.float64)
                                 @ torch.randn(2, config.nf, generator=g, dtype=torch.float64))
        built, error = decomposition.compress(planted, 2, None)
        assert error < 1e-10
        x = config.input()
        with torch.no_grad():
            assert rel(built(x), planted(x)) < 1e-10
        SVD().check("round2", built)  # a later round re-truncates it with plain svd


def test_hf_conv1d_is_recognised_by_structure_only():
    assert not is_hf_conv1d(nn.Linear(3, 4))

    class Conv1D(nn.Module):  # right name, wrong structure
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))
            self.nf = 5

    with pytest.raises(UnsupportedLayerError, match="does not look like transformers'"):
        SVDHFConv1D().check("h.0.attn.c_attn", Conv1D())
    with pytest.raises(UnsupportedLayerError, match="accepts transformers' Conv1D"):
        SVDHFConv1D().check("fc", nn.Linear(3, 4))


@pytest.mark.parametrize("name", list(RNN_LAYERS))
def test_recurrent_full_rank_is_exact_with_state(name):
    config = RNN_LAYERS[name]
    module = config.module()
    decomposition = SVDRecurrent()
    built, error = decomposition.compress(module, decomposition.full_rank(module), None)
    assert error < 1e-10
    x = config.input()
    dirs = 2 if config.bidirectional else 1
    p = config.proj_size or config.hidden_size
    h0 = torch.randn(config.num_layers * dirs, 2, p, dtype=torch.float64)
    if config.kind is nn.LSTM:
        hx = (h0, torch.randn(config.num_layers * dirs, 2, config.hidden_size, dtype=torch.float64))
    else:
        hx = h0
    with torch.no_grad():
        got, want = built(x, hx), module(x, hx)
        flat = lambda v: torch.cat([t.flatten() for t in  # noqa: E731
                                    (v[0], *(v[1] if isinstance(v[1], tuple) else (v[1],)))])
        assert rel(flat(got), flat(want)) < 1e-10
        assert rel(built(x)[0], module(x)[0]) < 1e-10  # hx=None as well
    assert type(built.rnn) is config.kind
    assert built.rnn.input_size == decomposition.full_rank(module)


def test_recurrent_planted_rank_bidirectional_shares_one_projection():
    module = RNN_LAYERS["lstm_bi_2layers_batch_first"].module()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 10, generator=g, dtype=torch.float64)
    with torch.no_grad():  # both directions read the same 3-dimensional subspace of the input
        module.weight_ih_l0.copy_(torch.randn(12, 3, generator=g, dtype=torch.float64) @ a)
        module.weight_ih_l0_reverse.copy_(torch.randn(12, 3, generator=g, dtype=torch.float64) @ a)
    built, error = SVDRecurrent().compress(module, 3, None)
    assert error < 1e-10 and isinstance(built, LowRankInputLSTM) and built.rank == 3
    x = RNN_LAYERS["lstm_bi_2layers_batch_first"].input()
    with torch.no_grad():
        assert rel(built(x)[0], module(x)[0]) < 1e-10
    # what is and is not factorized: W_hh and layer 1 are the original tensors
    assert torch.equal(built.rnn.weight_hh_l0, module.weight_hh_l0)
    assert torch.equal(built.rnn.weight_ih_l1_reverse, module.weight_ih_l1_reverse)
    params = sum(p.numel() for p in built.parameters())
    assert params == SVDRecurrent().param_count(module, 3)


def test_recurrent_packed_sequence_and_unbatched_and_recompression():
    config = RNN_LAYERS["gru_bi"]
    module = config.module()
    decomposition = SVDRecurrent()
    built, _ = decomposition.compress(module, decomposition.full_rank(module), None)
    assert isinstance(built, LowRankInputGRU)
    x = config.input()
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)
    with torch.no_grad():
        assert rel(built(packed)[0].data, module(packed)[0].data) < 1e-10
        assert rel(built(x[:, 0])[0], module(x[:, 0])[0]) < 1e-10  # unbatched (T, in)
    again, error = decomposition.compress(built, 2, None)
    assert again.rank == 2 and 0 < error < 1
    with torch.no_grad():  # truncating the full-rank copy = truncating the original
        direct = decomposition.reconstruct(decomposition.decompose(decomposition.weight(module), 2))
        assert rel(decomposition.weight(again), direct) < 1e-8


def test_recurrent_rejects_subclasses():
    class MyLSTM(nn.LSTM):
        pass

    with pytest.raises(UnsupportedLayerError, match="stock nn.LSTM"):
        SVDRecurrent().check("rnn", MyLSTM(3, 2))


# -- grouped and depthwise convolutions ------------------------------------------------------


@pytest.mark.parametrize("decomposition, module", [
    (SVD1d(), nn.Conv1d(8, 8, 1, groups=8)),
    (Tucker21d(), nn.Conv1d(8, 16, 3, groups=8)),
])
def test_depthwise_conv1d_is_skipped_with_a_reason(decomposition, module):
    with pytest.raises(UnsupportedLayerError, match="depthwise.*no channel rank to cut"):
        decomposition.check("features.dw", module)


@pytest.mark.parametrize("decomposition, module", [
    (SVD1d(), nn.Conv1d(8, 12, 1, groups=4)),
    (Tucker21d(), nn.Conv1d(8, 12, 3, groups=2)),
])
def test_grouped_conv1d_error_names_groups(decomposition, module):
    with pytest.raises(UnsupportedLayerError, match=r"'features.g'.*groups=\d.*per group"):
        decomposition.check("features.g", module)


def test_kernel_mismatch_points_to_the_other_decomposition():
    with pytest.raises(UnsupportedLayerError, match="use 'tucker2_1d'"):
        SVD1d().check("c", nn.Conv1d(3, 4, 3))
    with pytest.raises(UnsupportedLayerError, match="use 'svd1d'"):
        Tucker21d().check("c", nn.Conv1d(3, 4, 1))


# -- one name for more layer types (the proposed 'svd' / 'tucker2') ---------------------------


def test_routed_svd_keeps_svd_on_its_layers_and_adds_the_new_ones():
    routed = Routed(SVD(), SVD1d(), SVDHFConv1D())
    assert routed.name == "svd" and routed.Params is SVD().Params
    check_decomposition(routed)  # the kit's default Linear / Conv2d layers, unchanged
    for check in KIT_CHECKS:
        check(routed, layers={**CONV1D_LAYERS, **HF_LAYERS})
    assert isinstance(routed.compress(HF_LAYERS["wide"].module(), 2, None)[0], SVDLinear)
    assert isinstance(routed.compress(CONV1D_LAYERS["k1"].module(), 2, None)[0], SVDConv1d)
    with pytest.raises(UnsupportedLayerError, match="depthwise"):
        routed.check("dw", nn.Conv1d(4, 4, 1, groups=4))
    with pytest.raises(UnsupportedLayerError, match="svd"):
        routed.check("lstm", nn.LSTM(3, 2))


def test_routed_tucker2_handles_conv1d():
    routed = Routed(Tucker2(), Tucker21d())
    for check in KIT_CHECKS + (check_planted_recovery,):
        check(routed, layers=CONV1D_LAYERS)
    check_decomposition(routed, layers={k: v for k, v in DEFAULT_LAYERS.items() if "3" in k})


# -- the engine -----------------------------------------------------------------------------


class Recognizer(nn.Module):
    """An OCR-style model: Conv1d features, a bidirectional LSTM, GPT-2 style Conv1D head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.mix = nn.Conv1d(32, 32, 1)
        self.dw = nn.Conv1d(32, 32, 3, padding=1, groups=32)
        self.lstm = nn.LSTM(32, 8, bidirectional=True, batch_first=True)
        self.head = Conv1D(10, 16)

    def forward(self, x):
        y = self.dw(torch.relu(self.mix(torch.relu(self.conv(x)))))
        y, _ = self.lstm(y.transpose(1, 2))
        return self.head(y.contiguous())  # a bidirectional batch-first LSTM's output is strided


def test_engine_compresses_every_new_layer_type(tmp_path):
    torch.manual_seed(0)
    model = Recognizer().eval()
    x = torch.randn(2, 16, 12)
    half = RankRule("param_reduction", rate=1.5)
    spec = Spec(rules=[
        Rule(match="conv1d_k1", decomposition="svd1d", rank=half),
        Rule(match="conv1d_kxk", decomposition="tucker2_1d", rank=half),
        Rule(match="recurrent", decomposition="svd_rnn", rank=RankRule("fixed", rank=8)),
        Rule(match="hf_conv1d", decomposition="svd_hf_conv1d", rank=RankRule("fixed", rank=4)),
    ])
    compressor = musco.Compressor(model, spec, example_inputs=x)
    plan = compressor.plan
    assert plan.entry("dw").status == "skipped" and "no channel rank" in plan.entry("dw").reason
    assert compressor.stats["lstm"].flops > 0  # counted by formula: FlopCounterMode says 0
    while not compressor.done:
        compressor.step()
    out = compressor.model
    assert isinstance(out.mix, SVDConv1d) and isinstance(out.conv, Tucker2Conv1d)
    assert isinstance(out.lstm, LowRankInputLSTM) and isinstance(out.head, SVDLinear)
    with torch.no_grad():
        assert out(x).shape == model(x).shape
    path = tmp_path / "state.pt"
    compressor.save(path)
    loaded = musco.load_compressed(Recognizer(), path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), out(x))
    with torch.no_grad():
        assert math.isfinite(float(out(x).sum()))


def test_matchers_are_registered():
    names = {m["name"] for m in musco.available()["matchers"]}
    assert {"conv1d", "conv1d_k1", "conv1d_kxk", "hf_conv1d", "recurrent"} <= names
    decs = {m["name"] for m in musco.available()["decompositions"]}
    assert {"svd1d", "tucker2_1d", "svd_hf_conv1d", "svd_rnn"} <= decs


def test_layer_types_page_runs_as_written(capsys):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "layer-types.md"
    namespace: dict = {"__name__": "__docs__"}
    for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        exec(compile(code, str(page), "exec"), namespace)
    assert "skipped" in capsys.readouterr().out
