"""Explicit int8 export: convert Linear layers to :class:`Int8DynamicLinear` (and opted-in word embeddings to
:class:`Int8Embedding`), save and load without pickles.

The folder holds ``config.json`` (the Hugging Face config), ``model.int8.safetensors`` (int8 weights,
their scales and everything else in float; with ``sparse``, pruned weights packed as their non-zero int8 values
and a 1-bit mask, :mod:`lightning_memopt.core.sparse_format`), ``quantization.json`` (format, model class,
converted layers) and, when known, the tokenizer. :func:`load_int8` rebuilds the model from the config, puts
int8 shells where the file says and loads the tensors: nothing is unpickled or imported from a name
other than a ``transformers`` model class.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                                  intermediate_size=64))
    >>> len(convert_to_int8(model))  # no QAT: post-training dynamic quantization of the encoder's Linear layers
    6
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from lightning_memopt.core.filters import ModuleFilter, default_filter, is_linear, linear_shape
from lightning_memopt.core.sources import transformers_model_class
from lightning_memopt.core.sparse_format import is_sparse_file, load_sparse, save_sparse
from lightning_memopt.quantization.modules import (
    FakeQuantConv1D,
    FakeQuantEmbedding,
    FakeQuantLinear,
    Int8DynamicLinear,
    Int8Embedding,
)

FORMAT = "lightning_memopt.int8-dynamic/1"
WEIGHTS_FILE = "model.int8.safetensors"
META_FILE = "quantization.json"


@dataclass(frozen=True)
class Int8Report:
    """Bytes of the converted weights (int8 + scales) against their float32 size, and the file size."""

    layers: int
    int8_weight_bytes: int
    fp32_weight_bytes: int
    file_bytes: int

    @property
    def ratio(self) -> float:
        return self.int8_weight_bytes / self.fp32_weight_bytes


def convert_to_int8(
    model: nn.Module,
    module_filter: ModuleFilter = default_filter,
    scales: Mapping[str, Tensor] | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """Replace Linear layers by :class:`Int8DynamicLinear` (embeddings named in ``names`` or trained with QAT by
    :class:`Int8Embedding`) in place; return their names.

    QAT layers (:class:`FakeQuantLinear`, :class:`FakeQuantEmbedding`) keep the weight scales they trained with. Without QAT layers,
    ``names`` (or else ``module_filter``) picks plain ``nn.Linear`` layers: post-training dynamic quantization.
    ``scales`` gives frozen per-layer scales to use instead of measuring them.
    """
    modules = dict(model.named_modules())
    chosen = names
    if chosen is None:
        chosen = [
            n for n, m in modules.items() if isinstance(m, (FakeQuantLinear, FakeQuantConv1D, FakeQuantEmbedding))
        ]
    if not chosen:
        chosen = [n for n, m in modules.items() if is_linear(m) and module_filter(m, n)]
    for name in chosen:
        layer, scale = modules[name], (scales or {}).get(name)
        if isinstance(layer, nn.Embedding):
            model.set_submodule(name, Int8Embedding.from_embedding(layer, scale))
            continue
        if not is_linear(layer):
            raise ValueError(
                f"{name} is a {type(layer).__name__}; only Linear, Conv1D and Embedding layers become int8."
            )
        model.set_submodule(name, Int8DynamicLinear.from_linear(layer, scale))
    return chosen


def save_int8(
    model: nn.Module, folder: str | Path, tokenizer_source: str | None = None, sparse: bool = False
) -> Int8Report:
    """Write a converted model (see the module docstring) and report the sizes; with ``sparse``, weights with at
    least 30 % zeros (unstructured pruning) are stored as their non-zero int8 values and a 1-bit mask."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (Int8DynamicLinear, Int8Embedding))}
    if not layers:
        raise ValueError("The model has no int8 layers; call convert_to_int8(model) first.")
    model.config.save_pretrained(folder)
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    if sparse:
        save_sparse(state, folder / WEIGHTS_FILE)
    else:
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "architecture": type(model).__name__, "int8_layers": sorted(layers), "sparse": sparse}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if tokenizer_source is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    int8_bytes = sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in layers.values())
    fp32_bytes = sum(4 * m.weight.numel() for m in layers.values())
    return Int8Report(len(layers), int8_bytes, fp32_bytes, (folder / WEIGHTS_FILE).stat().st_size)


def load_int8(folder: str | Path) -> nn.Module:
    """Load a folder written by :func:`save_int8`, in eval mode."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} has no {META_FILE}; it was not written by save_int8 / memopt export --int8.")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this version reads {FORMAT!r}.")
    model_class = transformers_model_class(meta["architecture"])
    if model_class is None:
        raise ValueError(f"{meta_path} names {meta['architecture']!r}, which is not a transformers model class.")
    config = transformers.AutoConfig.from_pretrained(folder)
    model = model_class(config)
    modules = dict(model.named_modules())
    for name in meta["int8_layers"]:
        layer = modules[name]
        if isinstance(layer, nn.Embedding):
            model.set_submodule(name, Int8Embedding(layer.num_embeddings, layer.embedding_dim))
        else:
            model.set_submodule(name, Int8DynamicLinear(*linear_shape(layer), layer.bias is not None))
    weights = folder / WEIGHTS_FILE
    model.load_state_dict(load_sparse(weights) if is_sparse_file(weights) else load_file(weights), strict=True)
    return model.eval()


def checkpoint_qat_state(checkpoint: Mapping) -> dict | None:
    """The QuantizationAwareTraining state saved in a Lightning checkpoint, if there is one."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("QuantizationAwareTraining"):
            return state
    return None


def convert_with_qat_state(model: nn.Module, state: Mapping | None, prefix: str = "model.") -> list[str]:
    """Convert ``model`` as a QAT checkpoint state says (its layers and frozen scales); post-training without one.

    ``prefix`` is the model's attribute path in the LightningModule the state was recorded on.
    """
    if state is None:
        return convert_to_int8(model)
    names = [name.removeprefix(prefix) for name in state["layers"]]
    scales = {name.removeprefix(prefix): value for name, value in state["frozen_scales"].items()}
    return convert_to_int8(model, scales=scales, names=names)
