"""Compression inside ``trainer.fit``: a Lightning callback that compresses, rewires and checkpoints.

Needs Lightning (``pip install 'musco[lightning]'``)::

    from musco_core.lightning import CompressionCallback

    callback = CompressionCallback(spec, example_inputs=torch.randn(1, 1, 28, 28),
                                   every_n_epochs=1, module_attr="net")
    trainer = lightning.Trainer(max_epochs=6, callbacks=[callback])
    trainer.fit(lit_module, train_loader)

Every ``every_n_epochs`` epochs (at the start of the epoch) or ``every_n_steps`` optimizer
steps (at the start of the batch) the callback runs one :meth:`Compressor.step` on the
LightningModule (or its submodule ``module_attr``) **in place**, then:

- rebuilds the trainer's optimizers with :func:`musco_core.rebuild_optimizer` (param
  groups, hyperparameters and the state of surviving parameters kept; the factors join
  the group of the layer they replace) and points the learning-rate schedulers at them,
  so that their progress is kept too;
- under DDP, wraps the module in a new ``DistributedDataParallel`` through Lightning's
  strategy, so that gradients of the new factors are all-reduced;
- logs the step's totals (``musco/params_before`` ...) to the trainer's loggers;
- saves the compressor's state (spec, plan, position, manifest, reports; not the
  weights, which the checkpoint holds already) in Lightning checkpoints, and on
  ``trainer.fit(ckpt_path=...)`` rebuilds the compressed structure on the module before
  Lightning loads the weights, so a run resumes mid-compression.

DDP: each rank compresses its own copy. The decompositions are deterministic functions
of the weights (SVD, HOOI and ALS with fixed initialisations; no random numbers), and DDP
keeps the weights identical on every rank, so every rank chooses the same ranks and
builds the same modules; the new ``DistributedDataParallel`` wrapper then broadcasts rank
0's parameters and buffers, so the weights are identical even where floating-point
results could differ between devices. Only single-device and DDP strategies are
supported (not FSDP or DeepSpeed, which shard the parameters).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "musco_core.lightning needs Lightning: pip install 'musco[lightning]' "
        f"(or pip install 'lightning>=2.2'); the import failed with: {exc}"
    ) from exc

from musco_core._util import device_of
from musco_core.engine import Compressor
from musco_core.finetune import parameter_names, rebuild_optimizer, retarget_schedulers
from musco_core.persist import rebuild
from musco_core.report import StepReport
from musco_core.spec import Spec

__all__ = ["CompressionCallback"]

log = logging.getLogger(__name__)


class CompressionCallback(Callback):
    """Compress a LightningModule step by step inside ``trainer.fit``; see the module docs.

    :param spec: a :class:`musco.Spec`, or a path to a spec file.
    :param example_inputs: inputs for one forward pass of the compressed module (a
        tensor, a tuple or a dict), as for :class:`Compressor`; moved to the module's
        device when the compressor is created.
    :param every_n_epochs: compress at the start of epochs ``start``, ``start + n`` ...
    :param every_n_steps: compress at the start of the batches where the trainer's
        ``global_step`` is ``start``, ``start + n`` ... (give exactly one of the two).
    :param start: the first epoch (or step) at which to compress; default 0, i.e. the
        model handed to ``fit`` is already trained.
    :param calibration: calibration batches for data-aware strategies (passed to the
        :class:`Compressor`).
    :param module_attr: dotted name of the submodule to compress (``"net"``); ``None``
        compresses the LightningModule itself (its ``forward`` must take
        ``example_inputs``).
    :param log_to_loggers: log each step's totals to ``trainer.loggers``.
    """

    def __init__(self, spec: Spec | str | Path, example_inputs: Any, *,
                 every_n_epochs: int | None = None, every_n_steps: int | None = None,
                 start: int = 0, calibration: Any = None, module_attr: str | None = None,
                 log_to_loggers: bool = True, registry=None):
        if (every_n_epochs is None) == (every_n_steps is None):
            raise ValueError("give exactly one of every_n_epochs and every_n_steps, got "
                             f"every_n_epochs={every_n_epochs!r}, every_n_steps={every_n_steps!r}")
        every = every_n_epochs if every_n_epochs is not None else every_n_steps
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every_n_{'epochs' if every_n_epochs else 'steps'} must be an "
                             f"int >= 1, got {every!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        self.spec = spec if isinstance(spec, Spec) else Spec.load(spec)
        self.example_inputs = example_inputs
        self.every = every
        self.unit = "epoch" if every_n_epochs is not None else "step"
        self.start = start
        self.calibration = calibration
        self.module_attr = module_attr
        self.log_to_loggers = log_to_loggers
        self.registry = registry
        #: The :class:`Compressor`, created when ``fit`` starts (or when a checkpoint is loaded).
        self.compressor: Compressor | None = None
        #: The epoch or step at which the last compression step ran.
        self.last: int | None = None
        self._patched = None

    # -- Lightning hooks ------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module_attr=self.module_attr)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        kind = type(trainer.strategy).__name__
        if not (kind.startswith("DDP") or kind.startswith("SingleDevice")):
            raise RuntimeError(f"CompressionCallback supports single-device and DDP strategies, "
                               f"not {kind}")
        # Lightning loads a checkpoint's weights into the module before it hands the
        # callbacks their state: rebuild the compressed structure first, from our part of
        # the checkpoint, right before the weights are loaded.
        strategy = trainer.strategy
        original = strategy.load_model_state_dict

        def load_model_state_dict(checkpoint: Mapping[str, Any], *args, **kwargs):
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state and state.get("compressor") is not None:
                self._restore(pl_module, state, checkpoint.get("state_dict", {}))
            return original(checkpoint, *args, **kwargs)

        strategy.load_model_state_dict = load_model_state_dict
        self._patched = strategy

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("load_model_state_dict", None)
            self._patched = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compressor is None:  # a fresh run: the module holds its trained weights now
            module = self._target(pl_module)
            self.compressor = Compressor(
                module, self.spec, _to_device(self.example_inputs, device_of(module)),
                calibration=self.calibration, inplace=True, progress=False,
                registry=self.registry)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._maybe_compress(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.unit == "step":
            self._maybe_compress(trainer, pl_module, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        if self.compressor is None:
            return {"compressor": None, "last": self.last}
        state = self.compressor.state_dict()
        state.pop("model", None)  # the checkpoint's state_dict holds the weights
        return {"compressor": state, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The structure and the compressor were restored before the weights were loaded
        # (see setup); here only the schedule's position remains.
        self.last = state_dict.get("last")

    # -- the work ---------------------------------------------------------------------------

    def _target(self, pl_module: nn.Module) -> nn.Module:
        return pl_module.get_submodule(self.module_attr) if self.module_attr else pl_module

    def _due(self, at: int) -> bool:
        return at >= self.start and (at - self.start) % self.every == 0 and at != self.last

    def _maybe_compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                        at: int) -> None:
        if self.compressor is None or self.compressor.done or not self._due(at):
            return
        names = parameter_names(pl_module)
        report = self.compressor.step()
        self.last = at
        self._rewire(trainer, pl_module, names)
        self._log(trainer, report)

    def _rewire(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                names: dict[int, str]) -> None:
        """New optimizers over the new parameters, schedulers pointed at them, DDP re-wrapped."""
        strategy = trainer.strategy
        wrapper = strategy.model
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
            # The old wrapper's reducer knows only the old parameters: wrap again (this also
            # broadcasts rank 0's parameters and buffers to every rank).
            strategy.model = strategy._setup_model(pl_module)
            if hasattr(strategy, "_register_ddp_hooks"):
                strategy._register_ddp_hooks()
        old = list(strategy.optimizers)
        new = [rebuild_optimizer(opt, pl_module, names=names) for opt in old]
        for config in strategy.lr_scheduler_configs:
            for before, after in zip(old, new):
                if getattr(config.scheduler, "optimizer", None) is before:
                    retarget_schedulers([config.scheduler], after)
        strategy.optimizers = new  # also rebuilds Lightning's optimizer wrappers

    def _log(self, trainer: pl.Trainer, report: StepReport) -> None:
        if trainer.is_global_zero:
            log.info("musco: %s", report)
        if not self.log_to_loggers or not trainer.loggers:
            return
        done = report.compressed
        metrics = {
            "musco/step": float(report.step),
            "musco/layers_compressed": float(len(done)),
            "musco/params_before": float(sum(r.params_before for r in done)),
            "musco/params_after": float(sum(r.params_after for r in done)),
            "musco/flops_before": float(sum(r.flops_before for r in done)),
            "musco/flops_after": float(sum(r.flops_after for r in done)),
            "musco/model_params": float(sum(p.numel() for p in self.compressor.model.parameters())),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _restore(self, pl_module: pl.LightningModule, state: Mapping[str, Any],
                 weights: Mapping[str, torch.Tensor]) -> None:
        """Rebuild the saved structure on the module in place and resume the compressor."""
        module = self._target(pl_module)
        original = copy.deepcopy(module)
        saved = dict(state["compressor"])
        rebuild(module, saved["manifest"], self.registry)
        prefix = f"{self.module_attr}." if self.module_attr else ""
        own = module.state_dict()
        saved["model"] = {k: weights.get(prefix + k, v) for k, v in own.items()}
        compressor = Compressor.from_state(
            saved, original, example_inputs=self.example_inputs, calibration=self.calibration,
            progress=False, registry=self.registry, source="the Lightning checkpoint")
        compressor.model = module  # continue in place, on the module Lightning trains
        self.compressor = compressor
        self.last = state.get("last")


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, tuple):
        return tuple(_to_device(x, device) for x in inputs)
    if isinstance(inputs, list):
        return [_to_device(x, device) for x in inputs]
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    return inputs
