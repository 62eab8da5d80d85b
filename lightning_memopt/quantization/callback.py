"""``QuantizationAwareTraining``: fine-tune any LightningModule with simulated int8, export real int8 explicitly.

At ``setup`` (before the optimizer is built and before a checkpoint is restored) the selected
``nn.Linear`` layers become :class:`~lightning_memopt.quantization.modules.FakeQuantLinear` in place:
same parameters, same names, same checkpoint keys. They compute with weights and activations rounded
exactly as the exported int8 kernel rounds them (see :mod:`.fake_quant`). Fake quantization starts at
``start`` (full precision before) and the weight scales can be frozen at ``freeze_ranges``; that state
is the callback's checkpoint state, so a resumed run continues with it.

Nothing is converted when fit ends: the module stays a trainable float module, ``trainer.test(ckpt_path=...)``
and a second ``fit`` work, and a QAT checkpoint loads into the unmodified module. The int8 model is made
on request: ``memopt export --ckpt_path ... --output_dir ... --int8 true``, or in Python
``convert_to_int8(model, scales=...)`` and ``save_int8(model, folder)``.

Combined with ``PruningScheduler``, pruned weights stay zero: zero rounds to zero on a symmetric grid.

Example:
    >>> qat = QuantizationAwareTraining(start=0.1, freeze_ranges=0.9)
    >>> trainer = Trainer(callbacks=[qat])  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_memopt.core.filters import ModuleFilter, as_filter, is_linear, linear_layers
from lightning_memopt.core.run_points import Unit, check_point, resolve_point, run_length
from lightning_memopt.core.strategies import refuse_strategies
from lightning_memopt.quantization.modules import FakeQuantLinear, prepare

UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def _patterns(modules: Sequence[str] | str) -> list[re.Pattern]:
    return [re.compile(p) for p in ([modules] if isinstance(modules, str) else modules)]


def qat_filter(modules: Sequence[str] | ModuleFilter | None) -> ModuleFilter:
    """The layers QAT fake-quantizes: linear layers as :func:`as_filter` picks them, and ``nn.Embedding`` tables
    whose names a pattern matches (opt-in: the default filter never picks embeddings)."""
    linear = as_filter(modules)
    if modules is None or callable(modules):
        return linear
    patterns = _patterns(modules)

    def selects(module: nn.Module, name: str) -> bool:
        return linear(module, name) or (isinstance(module, nn.Embedding) and any(p.search(name) for p in patterns))

    return selects


def check_selection(model: nn.Module, modules: Sequence[str] | ModuleFilter | None) -> None:
    """Name patterns that pick layers QAT cannot quantize (only ``nn.Linear``, ``Conv1D`` and ``nn.Embedding``
    can) are an error."""
    if modules is None or callable(modules):
        return
    patterns = _patterns(modules)
    other = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if name and not is_linear(m) and not isinstance(m, nn.Embedding)
        if isinstance(getattr(m, "weight", None), nn.Parameter) and any(p.search(name) for p in patterns)
    ]
    if other:
        raise ValueError(
            f"The modules filter selects layers QAT cannot quantize: {other[:5]}. Only Linear (and Conv1D) layers "
            "and embedding tables become int8; narrow the patterns to those."
        )


class QuantizationAwareTraining(Callback):
    """Simulate the int8 CPU kernel in the selected Linear layers while fine-tuning.

    Args:
        modules: ``None`` for the encoder's Linear layers (not embeddings, pooler or classifier), a list of
            regular expressions matched against module names (e.g. add ``"classifier"``, or ``"lm_head"`` and
            ``"embed_tokens"``/``"word_embeddings"``: embedding tables matched by name become int8 rows with one
            scale per row), or a ``(module, name) -> bool`` callable.
        start: when fake quantization begins: optimizer steps (int, or epochs with ``unit="epochs"``) or a
            fraction of the run (float). Full precision before.
        freeze_ranges: when the weight scales stop following the weights (same units); ``None`` never.
            Activation ranges are measured on every call, as the int8 kernel does, so they are not frozen.
        unit: what integer ``start`` and ``freeze_ranges`` count: ``"steps"`` or ``"epochs"``.
    """

    def __init__(
        self,
        modules: Sequence[str] | ModuleFilter | None = None,
        start: int | float = 0,
        freeze_ranges: int | float | None = None,
        unit: Unit = "steps",
    ) -> None:
        for option, value in (("start", start), ("freeze_ranges", freeze_ranges)):
            check_point(option, value, unit)  # before any training
        if freeze_ranges is not None and type(start) is type(freeze_ranges) and freeze_ranges < start:
            raise ValueError(f"freeze_ranges={freeze_ranges} comes before start={start}; freeze after QAT starts.")
        self.modules = modules
        self.module_filter = qat_filter(modules)
        self.start, self.freeze_ranges, self.unit = start, freeze_ranges, unit
        self.layers: dict[str, FakeQuantLinear] = {}
        self.enabled = False
        self.frozen_scales: dict[str, Tensor] = {}
        self.start_step = 0
        self.freeze_step: int | None = None
        self.evaluating = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": sorted(self.layers),
            "enabled": self.enabled,
            "frozen_scales": {name: scale.cpu() for name, scale in self.frozen_scales.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.enabled = bool(state_dict["enabled"])
        self.frozen_scales = dict(state_dict.get("frozen_scales", {}))
        self._restored_layers = list(state_dict.get("layers", []))
        if self.layers:  # validate/test restore callbacks after setup: evaluate with the checkpoint's frozen scales
            self._set(enabled=self.enabled or self.evaluating)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_strategies(
            trainer,
            "QuantizationAwareTraining",
            UNSUPPORTED_STRATEGIES,
            "sharded parameters cannot be fake-quantized per output channel yet",
            "--trainer.strategy ddp (or one device)",
        )
        check_selection(pl_module, self.modules)
        names = prepare(pl_module, self.module_filter)
        if not names:
            raise ValueError(
                f"The modules filter selects no Linear layer of {type(pl_module).__name__} (it has "
                f"{linear_layers(pl_module)}); "
                "pass name patterns that match some of them."
            )
        self.layers = {n: pl_module.get_submodule(n) for n in names}
        self.evaluating = stage != "fit"
        self._set(enabled=self.evaluating or self.enabled)  # evaluation alone runs the quantized model

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restored = getattr(self, "_restored_layers", None)
        if restored is not None and restored != sorted(self.layers):
            raise ValueError(
                "The checkpoint was trained with QAT on other layers than the current `modules` filter selects: "
                f"only in the checkpoint {sorted(set(restored) - set(self.layers))}, "
                f"not in it {sorted(set(self.layers) - set(restored))}. Use the same filter to resume."
            )
        length = run_length(trainer)
        steps = length.total_steps
        self.start_step = resolve_point("start", self.start, length, self.unit) or 0
        self.freeze_step = resolve_point("freeze_ranges", self.freeze_ranges, length, self.unit)
        for option, step in (("start", self.start_step), ("freeze_ranges", self.freeze_step)):
            if step is not None and step > steps:
                raise ValueError(f"{option} resolves to step {step}, but the run has only {steps} optimizer steps.")
        rank_zero_info(
            f"QuantizationAwareTraining: {len(self.layers)} layers, int8 fake quantization from step "
            f"{self.start_step}" + (f", weight scales frozen at step {self.freeze_step}." if self.freeze_step else ".")
        )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.enabled and step >= self.start_step:
            self._set(enabled=True)
        if self.freeze_step is not None and not self.frozen_scales and step >= self.freeze_step:
            with torch.no_grad():  # weights are identical on every rank under DDP, so are these
                self.frozen_scales = {name: layer.scales().clone() for name, layer in self.layers.items()}
            self._set(enabled=self.enabled)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("qat_enabled", float(self.enabled), on_step=True, on_epoch=False)

    def _set(self, enabled: bool) -> None:
        self.enabled = enabled
        for name, layer in self.layers.items():
            layer.fake_quant = enabled
            frozen = self.frozen_scales.get(name)
            layer.frozen_scales = None if frozen is None else frozen.to(layer.weight.device)
