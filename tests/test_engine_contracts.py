"""What the engine holds plugins to: gates' report fields; resuming a joint rule without data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import musco_core as musco


class Chatty(musco.GateStrategy):
    """A gate that tries to write report fields that are the engine's."""

    name = "chatty"

    def adjust(self, layer, rank, context, params):
        return rank, {"warning": "mine", "time_before": 1.0}


def test_a_gate_setting_an_engine_report_field_is_a_compression_error_naming_it():
    class Plugin:
        @musco.hookimpl
        def musco_add_gates(self, register):
            register(Chatty())

    registry = musco.Registry()
    registry.register_plugin(Plugin(), name="chatty-gate")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=2), gates=["chatty"])])
    compressor = musco.Compressor(model, spec, torch.randn(2, 16), registry=registry,
                                  inplace=True)
    with pytest.raises(musco.CompressionError) as caught:
        compressor.step()
    assert caught.value.strategy == "gate 'chatty'"
    assert "returned report fields ['warning']" in str(caught.value)
    assert "may set only ['time_after', 'time_before']" in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resuming_a_joint_rule_without_example_inputs_or_data_says_what_to_pass(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 8))
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("budget", flop_reduction=1.3,
                                                            grid=3))],
                      layers_per_step=10, rounds=2)
    compressor = musco.Compressor(model, spec, torch.randn(2, 32), progress=False)
    compressor.step()
    compressor.save(tmp_path / "run.musco")
    resumed = musco.Compressor.resume(tmp_path / "run.musco", model, progress=False)
    with pytest.raises(musco.MuscoError, match="pass example_inputs= .* to Compressor.resume"):
        resumed.step()  # round 2: budget measures damage
    again = musco.Compressor.resume(tmp_path / "run.musco", model,
                                    example_inputs=torch.randn(2, 32), progress=False)
    again.step()
    assert again.done


def test_a_raising_wrapper_is_blamed_on_its_own_plugin():
    class Plain:
        @musco.hookimpl
        def musco_step_finished(self, step):
            pass

    class Wrapper:
        @musco.hookimpl(wrapper=True)
        def musco_step_finished(self, step):
            yield
            raise RuntimeError("wrapper broke")

    registry = musco.Registry()
    registry.register_plugin(Plain(), name="plain_one")
    registry.register_plugin(Wrapper(), name="the_wrapper")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=2))])
    compressor = musco.Compressor(model, spec, torch.randn(2, 16), registry=registry)
    with pytest.warns(musco.MuscoWarning, match="of plugin 'the_wrapper' raised RuntimeError"):
        compressor.step()
    assert compressor.position == 1
