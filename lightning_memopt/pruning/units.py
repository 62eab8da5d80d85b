"""Structured units of a transformer: attention heads and feed-forward neurons, as slices of parameters.

A *unit group* is one layer's heads (or one block's neurons). Each unit owns a slice of several
parameters: head ``h`` owns rows ``h·d … (h+1)·d`` of the query, key and value weights and biases and
the same columns of the attention output weight; neuron ``j`` owns row ``j`` of the up projection
(and its bias) and column ``j`` of the down projection. Zeroing those slices removes the unit exactly,
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

# (input projections, output projection, attribute holding the head count) relative to the attention block
ATTENTION_LAYOUTS = (
    (("self.query", "self.key", "self.value"), "output.dense", "self.num_attention_heads"),  # BERT family
    (("q_lin", "k_lin", "v_lin"), "out_lin", "n_heads"),  # DistilBERT
)
# (up projection, down projection) relative to the transformer block
FFN_LAYOUTS = (
    ("intermediate.dense", "output.dense"),  # BERT, RoBERTa, ELECTRA, XLM-R, MPNet
    ("ffn.lin1", "ffn.lin2"),  # DistilBERT
)


@dataclass(frozen=True)
class UnitSlice:
    """A parameter a unit group owns a slice of: along ``dim`` (0 = rows/bias entries, 1 = columns)."""

    param: str
    dim: int


@dataclass(frozen=True)
class UnitGroup:
    """The prunable units of one layer: ``count`` heads (or neurons) of ``size`` features each."""

    name: str
    kind: Literal["head", "neuron"]
    count: int
    size: int
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


def _linear_slices(prefix: str, path: str, layer: nn.Linear, dim: int) -> list[UnitSlice]:
    pieces = [UnitSlice(f"{prefix}{path}.weight", dim)]
    if layer.bias is not None and dim == 0:
        pieces.append(UnitSlice(f"{prefix}{path}.bias", 0))
    return pieces


def _attention_group(name: str, module: nn.Module) -> UnitGroup | None:
    for inputs, output, heads_attribute in ATTENTION_LAYOUTS:
        layers = [_get(module, path) for path in (*inputs, output)]
        heads = _get(module, heads_attribute)
        if not all(isinstance(layer, nn.Linear) for layer in layers) or not isinstance(heads, int):
            continue
        prefix = f"{name}." if name else ""
        slices = [
            piece
            for path, layer in zip(inputs, layers[:-1], strict=True)
            for piece in _linear_slices(prefix, path, layer, 0)
        ]
        slices += _linear_slices(prefix, output, layers[-1], 1)
        width = layers[-1].in_features
        return UnitGroup(name, "head", heads, width // heads, tuple(slices), f"{prefix}{output}.weight")
    return None


def _ffn_group(name: str, module: nn.Module) -> UnitGroup | None:
    for up_path, down_path in FFN_LAYOUTS:
        up, down = _get(module, up_path), _get(module, down_path)
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
            prefix = f"{name}." if name else ""
            slices = _linear_slices(prefix, up_path, up, 0) + _linear_slices(prefix, down_path, down, 1)
            return UnitGroup(name, "neuron", up.out_features, 1, tuple(slices), f"{prefix}{down_path}.weight")
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
            f"{[a[:2] for a in ATTENTION_LAYOUTS]}; feed-forward layouts: {list(FFN_LAYOUTS)}."
        )
    return groups


def unit_index(group: UnitGroup, keep: Tensor) -> Tensor:
    """``keep`` (one bool per unit) expanded to one bool per feature along the owned dimension."""
    return keep.repeat_interleave(group.size)


def param_masks(group: UnitGroup, keep: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Boolean masks, shaped like the group's parameters (``shapes``), that zero the units ``keep`` drops."""
    features = unit_index(group, keep)
    masks = {}
    for piece in group.slices:
        shape = shapes[piece.param]
        view = [1] * len(shape)
        view[piece.dim] = -1
        masks[piece.param] = features.view(view).expand(shape).clone()
    return masks


def magnitude_scores(group: UnitGroup, params: Mapping[str, Tensor]) -> Tensor:
    """The L2 norm of the weights (not biases) each unit owns: ``count`` values."""
    squares = torch.zeros(group.count, dtype=torch.float32, device=params[group.output].device)
    for piece in group.slices:
        if piece.param.endswith(".bias"):
            continue
        weight = params[piece.param].detach().float()
        per_feature = weight.pow(2).sum(dim=1 - piece.dim)
        squares += per_feature.view(group.count, group.size).sum(dim=1)
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
