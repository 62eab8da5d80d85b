"""``OpenVINOQuantizationAwareTraining``: train the static int8 model OpenVINO runs, with NNCF's quantizers.

OpenVINO's fastest CPU path is static int8: int8 weights (per output channel) and int8 activations with
fixed, calibrated scales, which NNCF (OpenVINO's compression library) places where OpenVINO executes
them. This callback fine-tunes exactly that model: at ``setup`` it calibrates NNCF's post-training
quantization for transformers (``nncf.quantize(..., model_type=TRANSFORMER)``: SmoothQuant, per-channel
weight and per-tensor activation quantizers, bias correction) on the first ``calibration_batches`` training
batches and puts the quantized model in place of the LightningModule's ``transformers`` model. Training then
moves the weights *and* the quantizers' scales (trainable parameters), straight through the rounding.
``memopt export --ckpt_path ... --format openvino --int8 true`` writes the IR with the trained scales;
``--format onnx --int8 true`` an ONNX graph of QuantizeLinear/DequantizeLinear pairs with the same scales, which
ONNX Runtime (and OpenVINO) run as int8.

The quantizers are part of the model, so their parameters are in the checkpoint (under
``<attribute>.__nncf_hooks.``). A resumed run, ``validate`` or ``test`` with this callback quantizes the
fresh model the same way (the quantizers' places depend on the graph, not on the data) and then loads the
checkpoint over it. Without the callback the checkpoint does not load into the plain module: export it.

Unlike :class:`~lightning_memopt.quantization.QuantizationAwareTraining` (PyTorch's dynamic int8 kernel),
quantization starts with training: to train in float first, make that a separate run (a ``memopt compress``
stage) and start this one from its export. Needs ``pip install 'lightning-memopt[deploy]'`` (nncf).

Example:
    >>> qat = OpenVINOQuantizationAwareTraining(calibration_batches=16)
    >>> trainer = Trainer(callbacks=[qat])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_memopt.core.models import pretrained_child
from lightning_memopt.core.strategies import refuse_strategies

HOOKS = "__nncf_hooks"  # the submodule NNCF adds to the quantized model; its state is the quantizers'
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
STATE_KEY = "OpenVINOQuantizationAwareTraining"
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
LOADERS = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader"}


def require_nncf() -> Any:
    if importlib.util.find_spec("nncf") is None:
        raise ModuleNotFoundError(
            "OpenVINOQuantizationAwareTraining needs NNCF: pip install 'lightning-memopt[deploy]'."
        )
    # NNCF compiles its C++ quantization kernels on first use in an environment (over a minute on 2 busy cores,
    # and each DDP rank waits on the same build) and gives up after 60 s by default (scripts/setup.sh builds them).
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "300")
    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)  # its per-step progress lines would flood the fit log
    return nncf


def model_inputs(batch: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """The model's inputs in a training batch (a mapping with ``input_ids`` and the like), on the CPU."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "OpenVINOQuantizationAwareTraining calibrates on the training batches, which must be mappings holding "
            f"the model's inputs {list(names)} (at least input_ids); this one is a {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            + ". Pass inputs= the keys your batches use."
        )
    return {name: batch[name].cpu() for name in names if isinstance(batch.get(name), Tensor)}


def quantize(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> nn.Module:
    """NNCF's transformer post-training quantization of ``model`` calibrated on ``batches`` (a new module)."""
    nncf = require_nncf()
    training = model.training
    device = next(model.parameters()).device
    items = [{name: tensor.to(device) for name, tensor in batch.items()} for batch in batches]
    quantized = nncf.quantize(
        model.eval(), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items)
    )
    return quantized.train(training)


def quantizer_count(model: nn.Module) -> int:
    """How many quantizers NNCF put in ``model`` (0 for a plain model)."""
    hooks = getattr(model, HOOKS, None)
    if hooks is None:
        return 0
    return sum(1 for module in hooks.modules() if "Quantizer" in type(module).__name__)


def holds_trained_quantizers(model: nn.Module, int8: bool) -> bool:
    """Whether ``model`` holds NNCF's quantizers; such a model exports only as int8 (its float form was never trained)."""
    trained = quantizer_count(model) > 0
    if trained and not int8:
        raise ValueError(
            "The model holds NNCF's int8 quantizers (OpenVINOQuantizationAwareTraining): export with --int8."
        )
    return trained


def load_quantized(model: nn.Module, state: Mapping[str, Tensor], example: Mapping[str, Tensor]) -> nn.Module:
    """The quantized model a checkpoint's ``state`` (the model's own keys, quantizers included) was trained as.

    ``model`` is the plain model; it is quantized again on ``example`` (which only fixes where the quantizers
    go) and ``state`` is loaded over it, strictly: weights, scales and SmoothQuant factors are the checkpoint's.
    """
    quantized = quantize(model, [example])
    quantized.load_state_dict(state, strict=True)
    return quantized.eval()


@contextmanager
def onnx_qdq_export(model: nn.Module) -> Iterator[None]:
    """While exporting to ONNX, NNCF's quantizers write QuantizeLinear/DequantizeLinear pairs with their scales
    (the standard ops ONNX Runtime and OpenVINO run as int8) instead of OpenVINO's FakeQuantize."""
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    quantizers = [module for module in model.modules() if isinstance(module, BaseQuantizer)]
    for quantizer in quantizers:
        quantizer.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.set_export_mode(QuantizerExportMode.FAKE_QUANTIZE)


def checkpoint_openvino_qat_state(checkpoint: Mapping) -> dict | None:
    """This callback's state in a Lightning checkpoint, if the run used it."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith(STATE_KEY):
            return state
    return None


class OpenVINOQuantizationAwareTraining(Callback):
    """Fine-tune the NNCF-quantized model (static int8, as OpenVINO runs it) in place of the float one.

    Args:
        calibration_batches: training batches the initial scales (and SmoothQuant factors) are measured on.
        inputs: the batch keys the ``transformers`` model takes (those present are used).
        attribute: the LightningModule attribute holding the ``transformers`` model; ``None`` finds the one there is.
    """

    def __init__(
        self, calibration_batches: int = 16, inputs: Sequence[str] = INPUTS, attribute: str | None = None
    ) -> None:
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches}: calibrate on at least one batch.")
        self.calibration_batches = calibration_batches
        self.inputs = tuple(inputs)
        self.attribute = attribute
        self.quantized: tuple[str, int] | None = None  # (attribute, quantizers) once the model is quantized
        self.used_inputs: list[str] = []
        self._restored: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.quantized is None:
            return {}
        attribute, quantizers = self.quantized
        return {"attribute": attribute, "quantizers": quantizers, "inputs": self.used_inputs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_strategies(
            trainer,
            type(self).__name__,
            UNSUPPORTED_STRATEGIES,
            "NNCF's quantizers wrap the whole model, which cannot be sharded",
            "--trainer.strategy ddp (or one device)",
        )
        require_nncf()
        attribute, model = pretrained_child(pl_module, self.attribute, option="attribute")
        if getattr(model, HOOKS, None) is not None:  # a second fit on the same module: quantized already
            self.quantized = (attribute, quantizer_count(model))
            self.used_inputs = list((self._restored or {}).get("inputs", self.used_inputs))
            return
        batches = self._calibration(trainer, pl_module, stage)
        self.used_inputs = sorted(batches[0])
        quantized = quantize(model, batches)
        setattr(pl_module, attribute, quantized)
        self.quantized = (attribute, quantizer_count(quantized))
        rank_zero_info(
            f"OpenVINOQuantizationAwareTraining: {type(model).__name__} quantized by NNCF ({self.quantized[1]} "
            f"int8 quantizers, calibrated on {len(batches)} batches); its scales train with the weights. Export with "
            "memopt export --format openvino --int8 true."
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored and self.quantized and self._restored.get("quantizers") != self.quantized[1]:
            raise ValueError(
                f"The checkpoint was trained with {self._restored.get('quantizers')} NNCF quantizers, this model has "
                f"{self.quantized[1]}: resume with the same model, inputs and nncf version."
            )

    def _calibration(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> list[dict[str, Tensor]]:
        """The first batches of the stage's data (training data for fit), the global RNG left untouched."""
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        method = LOADERS.get(stage, "predict_dataloader")
        loader: Iterable = getattr(source, method)()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        with torch.random.fork_rng(devices=[]):  # drawing a shuffled order must not change the run's
            batches = [model_inputs(batch, self.inputs) for batch in islice(loader, self.calibration_batches)]
        if not batches:
            raise ValueError(f"OpenVINOQuantizationAwareTraining: {method}() gave no batch to calibrate on.")
        return batches
