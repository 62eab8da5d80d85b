"""Structured units of a transformer: attention heads and feed-forward neurons, as slices of parameters.

A *unit group* is one layer's heads (or one block's neurons). Each unit owns a slice of several
parameters: head ``h`` owns rows ``h·d … (h+1)·d`` of the query, key and value weights and biases and
the same columns of the attention output weight; neuron ``j`` owns row ``j`` of the up projection
(of the gate and up projections for gated units such as SwiGLU, and their biases) and column ``j`` of the
down projection. Under grouped-query attention the unit is a key/value group: one key and one value head
with the query heads that share them (their rows, and their columns of the output projection), so the
shrunk model still has whole groups. The layouts known are listed in ``ATTENTION_LAYOUTS`` and
``FFN_LAYOUTS`` (BERT family, DistilBERT, Llama-style decoders); :func:`register_layout` adds others. Zeroing those slices removes the unit exactly,
so structured pruning reuses the weight-mask machinery, and export can cut the zero slices out.

Importance scores, per unit:

- ``magnitude``: the L2 norm of all the weights the unit owns;
- ``gradient``: ``|dL/dm|`` for a gate ``m`` (= 1) on the unit's output, which equals the sum of
  ``W ⊙ dL/dW`` over the unit's input columns of the output projection (Michel et al., 2019, for heads;
  Molchanov et al., 2019, for neurons), accumulated over training steps.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    >>> groups = find_unit_groups(model, "heads_and_neurons")
    >>> [(g.name, g.count) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
    [('encoder.layer.0', 64), ('encoder.layer.0.attention', 4),
     ('encoder.layer.1', 64), ('encoder.layer.1.attention', 4)]
    >>> shapes = {name: p.shape for name, p in model.named_parameters()}
    >>> masks = param_masks(groups[1], torch.tensor([True, False, True, True]), shapes)
    >>> masks["encoder.layer.0.attention.self.query.weight"].shape, masks["encoder.layer.0.attention.output.dense.weight"][0, 8:16].any()
    (torch.Size([32, 32]), tensor(False))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Structure = Literal["heads", "neurons", "heads_and_neurons"]


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention block keeps its projections (paths relative to the block) and its head count or size.

    The unit is a key/value group: the query heads sharing one key/value head (grouped-query attention), or
    one head where every query head has its own (multi-head attention). Give ``heads`` (an attribute holding
    the number of heads) or ``head_dim`` (one holding the size of a head).
    """

    query: str
    key: str
    value: str
    output: str
    heads: str | None = None
    head_dim: str | None = None

    @property
    def inputs(self) -> tuple[str, str, str]:
        return (self.query, self.key, self.value)


@dataclass(frozen=True)
class FFNLayout:
    """A feed-forward block's projections (paths relative to the transformer block): the ones that make the
    hidden neurons (``up``: one, or gate and up for gated units such as SwiGLU) and the one that reads them."""

    up: tuple[str, ...]
    down: str


ATTENTION_LAYOUTS: list[AttentionLayout] = [
    AttentionLayout("self.query", "self.key", "self.value", "output.dense", heads="self.num_attention_heads"),  # BERT
    AttentionLayout("q_lin", "k_lin", "v_lin", "out_lin", heads="n_heads"),  # DistilBERT
    AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj", head_dim="head_dim"),  # Llama, Mistral, Qwen2 (GQA)
]
FFN_LAYOUTS: list[FFNLayout] = [
    FFNLayout(("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, ELECTRA, XLM-R, MPNet
    FFNLayout(("ffn.lin1",), "ffn.lin2"),  # DistilBERT
    FFNLayout(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama, Mistral, Qwen2 (SwiGLU)
]


def register_layout(layout: AttentionLayout | FFNLayout) -> None:
    """Teach structured pruning (and ``shrink_pruned``) another architecture's attention or feed-forward layout,
    e.g. GPT-J's feed-forward block: ``register_layout(FFNLayout(("mlp.fc_in",), "mlp.fc_out"))``."""
    layouts: list = ATTENTION_LAYOUTS if isinstance(layout, AttentionLayout) else FFN_LAYOUTS
    if layout not in layouts:
        layouts.append(layout)


@dataclass(frozen=True)
class UnitSlice:
    """A parameter a unit group owns a slice of: ``size`` features per unit along ``dim`` (0 = rows/bias, 1 = columns)."""

    param: str
    dim: int
    size: int


@dataclass(frozen=True)
class UnitGroup:
    """The prunable units of one layer: ``count`` heads / key-value groups (or neurons), each owning a slice of
    every parameter in ``slices``."""

    name: str
    kind: Literal["head", "neuron"]
    count: int
    size: int  # features per unit at the output projection's input
    slices: tuple[UnitSlice, ...]
    output: str  # the output projection's weight, whose input columns carry the units

    @property
    def params(self) -> list[str]:
        return [piece.param for piece in self.slices]


def _get(module: nn.Module, path: str) -> object | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _linear_slices(prefix: str, path: str, layer: nn.Linear, dim: int, size: int) -> list[UnitSlice]:
    pieces = [UnitSlice(f"{prefix}{path}.weight", dim, size)]
    if layer.bias is not None and dim == 0:
        pieces.append(UnitSlice(f"{prefix}{path}.bias", 0, size))
    return pieces


def _attention_group(name: str, module: nn.Module) -> UnitGroup | None:
    for layout in ATTENTION_LAYOUTS:
        query, key, value, output = (_get(module, path) for path in (*layout.inputs, layout.output))
        if not all(isinstance(layer, nn.Linear) for layer in (query, key, value, output)):
            continue
        heads = _get(module, layout.heads) if layout.heads else None
        head_dim = _get(module, layout.head_dim) if layout.head_dim else None
        if isinstance(heads, int) and heads > 0:
            groups = heads
        elif isinstance(head_dim, int) and head_dim > 0:
            groups = key.out_features // head_dim  # one unit per key/value head
        else:
            continue
        prefix = f"{name}." if name else ""
        width = query.out_features // groups  # query features per unit (several heads under GQA)
        slices = _linear_slices(prefix, layout.query, query, 0, width)
        for path, layer in ((layout.key, key), (layout.value, value)):
            slices += _linear_slices(prefix, path, layer, 0, layer.out_features // groups)
        slices += _linear_slices(prefix, layout.output, output, 1, width)
        return UnitGroup(name, "head", groups, width, tuple(slices), f"{prefix}{layout.output}.weight")
    return None


def _ffn_group(name: str, module: nn.Module) -> UnitGroup | None:
    for layout in FFN_LAYOUTS:
        ups, down = [_get(module, path) for path in layout.up], _get(module, layout.down)
        if not isinstance(down, nn.Linear) or not all(isinstance(up, nn.Linear) for up in ups):
            continue
        if any(up.out_features != down.in_features for up in ups):
            continue
        prefix = f"{name}." if name else ""
        slices = [
            piece for path, up in zip(layout.up, ups, strict=True) for piece in _linear_slices(prefix, path, up, 0, 1)
        ]
        slices += _linear_slices(prefix, layout.down, down, 1, 1)
        return UnitGroup(name, "neuron", down.in_features, 1, tuple(slices), f"{prefix}{layout.down}.weight")
    return None


def find_unit_groups(model: nn.Module, structure: Structure) -> list[UnitGroup]:
    """Every attention block's heads and/or every block's feed-forward neurons, in module order."""
    if structure not in ("heads", "neurons", "heads_and_neurons"):
        raise ValueError(f"structure must be 'heads', 'neurons' or 'heads_and_neurons', got {structure!r}.")
    groups = []
    for name, module in model.named_modules():
        if structure in ("heads", "heads_and_neurons") and (group := _attention_group(name, module)):
            groups.append(group)
        if structure in ("neurons", "heads_and_neurons") and (group := _ffn_group(name, module)):
            groups.append(group)
    if not groups:
        raise ValueError(
            f"No {structure.replace('_', ' and ')} found in {type(model).__name__}. Known attention layouts: "
            f"{[layout.inputs for layout in ATTENTION_LAYOUTS]}; feed-forward layouts: "
            f"{[(*layout.up, layout.down) for layout in FFN_LAYOUTS]}. Declare yours with "
            "lightning_memopt.pruning.register_layout."
        )
    return groups


def unit_index(keep: Tensor, size: int) -> Tensor:
    """``keep`` (one bool per unit) expanded to one bool per feature of a slice owning ``size`` features per unit."""
    return keep.repeat_interleave(size)


def param_masks(group: UnitGroup, keep: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Boolean masks, shaped like the group's parameters (``shapes``), that zero the units ``keep`` drops."""
    masks = {}
    for piece in group.slices:
        shape = shapes[piece.param]
        view = [1] * len(shape)
        view[piece.dim] = -1
        masks[piece.param] = unit_index(keep, piece.size).view(view).expand(shape).clone()
    return masks


def magnitude_scores(group: UnitGroup, params: Mapping[str, Tensor]) -> Tensor:
    """The L2 norm of the weights (not biases) each unit owns: ``count`` values."""
    squares = torch.zeros(group.count, dtype=torch.float32, device=params[group.output].device)
    for piece in group.slices:
        if piece.param.endswith(".bias"):
            continue
        weight = params[piece.param].detach().float()
        per_feature = weight.pow(2).sum(dim=1 - piece.dim)
        squares += per_feature.view(group.count, piece.size).sum(dim=1)
    return squares.sqrt()


def mask_gradient(group: UnitGroup, weight: Tensor, grad: Tensor) -> Tensor:
    """``dL/dm`` for a gate on each unit: ``W ⊙ dL/dW`` of the output projection summed per unit's columns."""
    per_column = (weight.detach().float() * grad.float()).sum(dim=0)
    return per_column.view(group.count, group.size).sum(dim=1)


def keep_top_units(scores: Tensor, kept: Tensor, prune: int) -> Tensor:
    """Prune ``prune`` units in all, lowest scores first; units already pruned (``kept`` False) stay pruned.

    >>> keep_top_units(torch.tensor([3.0, 1.0, 2.0, 4.0]), torch.tensor([True, True, True, False]), 2)
    tensor([ True, False,  True, False])
    """
    if not 0 <= prune < scores.numel():
        raise ValueError(f"Cannot prune {prune} of {scores.numel()} units: at least one unit per layer stays.")
    ranked = torch.where(kept, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.argsort(ranked, descending=True, stable=True)
    keep = torch.zeros_like(kept)
    keep[order[: scores.numel() - prune]] = True
    return keep


def units_to_prune(count: int, sparsity: float) -> int:
    """How many of ``count`` units a sparsity removes (rounded, and always leaving one)."""
    return min(count - 1, round(sparsity * count))
