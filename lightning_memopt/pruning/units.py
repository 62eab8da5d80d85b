"""Structured units of a transformer: attention heads and feed-forward neurons, as slices of parameters.

A *unit group* is one layer's heads (or one block's neurons). Each unit owns a slice of several
parameters: head ``h`` owns output features ``h·d … (h+1)·d`` of the query, key and value projections
(weight and bias) and the same input features of the attention output projection; neuron ``j`` owns output
feature ``j`` of the up projection (of the gate and up projections for gated units such as SwiGLU, and their
biases) and input feature ``j`` of the down projection. Under grouped-query attention the unit is a key/value
group: one key and one value head with the query heads that share them (their features, and their inputs of
the output projection), so the shrunk model still has whole groups. The layouts known are listed in
``ATTENTION_LAYOUTS`` and ``FFN_LAYOUTS`` (BERT family, DistilBERT, Llama-style decoders, GPT-2);
:func:`register_layout` adds others. Zeroing those slices removes the unit exactly, so structured pruning
reuses the weight-mask machinery, and export can cut the zero slices out.

Projections are ``nn.Linear`` (weight ``[out, in]``) or ``transformers``' ``Conv1D`` (GPT-2; weight
``[in, out]``): a :class:`UnitSlice` names the weight's tensor dimension the unit's features lie along, so
masks, scores and shrinking never need to know which. A *fused* projection making query, key and value in
one (GPT-2's ``c_attn``, output ``q|k|v``) is declared by giving the same path for all three:
``AttentionLayout("c_attn", "c_attn", "c_attn", "c_proj", heads="num_heads", split="split_size")``. Its
slice has ``parts=3``: head ``h`` owns features ``h·d … (h+1)·d`` of each third (offsets 0, hidden and
2·hidden), bias included. ``heads`` and ``split`` name the block's attributes that count its heads and the
width its forward splits the fused output by; cutting heads updates them.

Importance scores, per unit:

- ``magnitude``: the L2 norm of all the weights the unit owns;
- ``gradient``: ``|dL/dm|`` for a gate ``m`` (= 1) on the unit's output, which equals the sum of
  ``W ⊙ dL/dW`` over the unit's input features of the output projection (Michel et al., 2019, for heads;
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

    GPT-2's fused ``c_attn`` (a ``Conv1D``, weight ``[32, 96]``): dropping head 1 drops its q, k and v columns.

    >>> from transformers import GPT2Config, GPT2Model
    >>> gpt2 = GPT2Model(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    >>> heads = find_unit_groups(gpt2, "heads")[0]
    >>> heads.name, heads.count, heads.slices[0]
    ('h.0.attn', 4, UnitSlice(param='h.0.attn.c_attn.weight', dim=1, size=8, parts=3))
    >>> shapes = {name: p.shape for name, p in gpt2.named_parameters()}
    >>> mask = param_masks(heads, torch.tensor([True, False, True, True]), shapes)["h.0.attn.c_attn.weight"]
    >>> (~mask[0]).nonzero().squeeze(1).tolist() == [*range(8, 16), *range(40, 48), *range(72, 80)]
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_memopt.core.filters import is_linear, linear_shape, output_dim

Structure = Literal["heads", "neurons", "heads_and_neurons"]


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention block keeps its projections (paths relative to the block) and its head count or size.

    The unit is a key/value group: the query heads sharing one key/value head (grouped-query attention), or
    one head where every query head has its own (multi-head attention). Give ``heads`` (an attribute holding
    the number of heads) or ``head_dim`` (one holding the size of a head). The same path for ``query``,
    ``key`` and ``value`` declares a fused projection whose output is ``q|k|v`` in three equal parts (GPT-2's
    ``c_attn``); ``split`` names an attribute holding the width of one part (heads * head size), which the
    block's forward splits by. Cutting heads sets ``heads`` and ``split`` to the kept values.
    """

    query: str
    key: str
    value: str
    output: str
    heads: str | None = None
    head_dim: str | None = None
    split: str | None = None

    @property
    def inputs(self) -> tuple[str, str, str]:
        return (self.query, self.key, self.value)

    @property
    def fused(self) -> bool:
        return self.query == self.key == self.value


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
    AttentionLayout("c_attn", "c_attn", "c_attn", "c_proj", heads="num_heads", split="split_size"),  # GPT-2 (fused)
]
FFN_LAYOUTS: list[FFNLayout] = [
    FFNLayout(("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, ELECTRA, XLM-R, MPNet
    FFNLayout(("ffn.lin1",), "ffn.lin2"),  # DistilBERT
    FFNLayout(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama, Mistral, Qwen2 (SwiGLU)
    FFNLayout(("mlp.c_fc",), "mlp.c_proj"),  # GPT-2 (Conv1D)
]


def register_layout(layout: AttentionLayout | FFNLayout) -> None:
    """Teach structured pruning (and ``shrink_pruned``) another architecture's attention or feed-forward layout,
    e.g. GPT-J's feed-forward block: ``register_layout(FFNLayout(("mlp.fc_in",), "mlp.fc_out"))``, or a fused
    query/key/value projection: ``AttentionLayout("qkv", "qkv", "qkv", "proj", heads="num_heads")``."""
    layouts: list = ATTENTION_LAYOUTS if isinstance(layout, AttentionLayout) else FFN_LAYOUTS
    if layout not in layouts:
        layouts.append(layout)


@dataclass(frozen=True)
class UnitSlice:
    """A parameter a unit group owns a slice of: ``size`` features per unit along the tensor's ``dim`` (an
    ``nn.Linear`` weight: 0 = output features, 1 = input features; a ``Conv1D`` weight the other way round; a
    bias: 0), repeated in ``parts`` equal blocks (3 for a fused ``q|k|v`` projection): unit ``i`` owns features
    ``i·size … (i+1)·size`` of every block."""

    param: str
    dim: int
    size: int
    parts: int = 1


@dataclass(frozen=True)
class UnitGroup:
    """The prunable units of one layer: ``count`` heads / key-value groups (or neurons), each owning a slice of
    every parameter in ``slices``. ``attributes``: module attributes (paths from the model) counting the units,
    with their value per unit; cutting units sets them to kept * value (GPT-2's ``num_heads``, ``split_size``)."""

    name: str
    kind: Literal["head", "neuron"]
    count: int
    size: int  # features per unit at the output projection's input
    slices: tuple[UnitSlice, ...]
    output: str  # the output projection's weight, whose input features carry the units
    attributes: tuple[tuple[str, int], ...] = ()

    @property
    def params(self) -> list[str]:
        return [piece.param for piece in self.slices]

    @property
    def output_slice(self) -> UnitSlice:
        return next(piece for piece in self.slices if piece.param == self.output)


def _get(module: nn.Module, path: str) -> object | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _layer_slices(
    prefix: str, path: str, layer: nn.Module, side: Literal["out", "in"], size: int, parts: int = 1
) -> list[UnitSlice]:
    """The unit slices of a linear layer's output (weight and bias) or input features (weight)."""
    out_dim = output_dim(layer)
    pieces = [UnitSlice(f"{prefix}{path}.weight", out_dim if side == "out" else 1 - out_dim, size, parts)]
    if layer.bias is not None and side == "out":
        pieces.append(UnitSlice(f"{prefix}{path}.bias", 0, size, parts))
    return pieces


def _attention_group(name: str, module: nn.Module) -> UnitGroup | None:
    for layout in ATTENTION_LAYOUTS:
        query, key, value, output = (_get(module, path) for path in (*layout.inputs, layout.output))
        if not all(is_linear(layer) for layer in (query, key, value, output)):
            continue
        parts = 3 if layout.fused else 1
        query_width, key_width = linear_shape(query)[1] // parts, linear_shape(key)[1] // parts
        if layout.fused and (linear_shape(query)[1] % 3 or linear_shape(output)[0] != query_width):
            continue  # not q|k|v in three equal parts (GPT-2's cross-attention makes k|v only)
        heads = _get(module, layout.heads) if layout.heads else None
        head_dim = _get(module, layout.head_dim) if layout.head_dim else None
        if isinstance(heads, int) and heads > 0:
            groups = heads
        elif isinstance(head_dim, int) and head_dim > 0:
            groups = key_width // head_dim  # one unit per key/value head
        else:
            continue
        if groups == 0 or query_width % groups or key_width % groups:
            continue
        prefix = f"{name}." if name else ""
        width = query_width // groups  # query features per unit (several heads under GQA)
        if layout.fused:
            slices = _layer_slices(prefix, layout.query, query, "out", width, parts)
        else:
            slices = _layer_slices(prefix, layout.query, query, "out", width)
            for path, layer in ((layout.key, key), (layout.value, value)):
                slices += _layer_slices(prefix, path, layer, "out", linear_shape(layer)[1] // groups)
        slices += _layer_slices(prefix, layout.output, output, "in", width)
        attributes = []
        if layout.heads:
            attributes.append((f"{prefix}{layout.heads}", 1))
        if layout.split and isinstance(_get(module, layout.split), int):
            attributes.append((f"{prefix}{layout.split}", width))
        output_weight = f"{prefix}{layout.output}.weight"
        return UnitGroup(name, "head", groups, width, tuple(slices), output_weight, tuple(attributes))
    return None


def _ffn_group(name: str, module: nn.Module) -> UnitGroup | None:
    for layout in FFN_LAYOUTS:
        ups, down = [_get(module, path) for path in layout.up], _get(module, layout.down)
        if not is_linear(down) or not all(is_linear(up) for up in ups):
            continue
        neurons = linear_shape(down)[0]
        if any(linear_shape(up)[1] != neurons for up in ups):
            continue
        prefix = f"{name}." if name else ""
        slices = [
            piece
            for path, up in zip(layout.up, ups, strict=True)
            for piece in _layer_slices(prefix, path, up, "out", 1)
        ]
        slices += _layer_slices(prefix, layout.down, down, "in", 1)
        return UnitGroup(name, "neuron", neurons, 1, tuple(slices), f"{prefix}{layout.down}.weight")
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


def unit_index(keep: Tensor, size: int, parts: int = 1) -> Tensor:
    """``keep`` (one bool per unit) expanded to one bool per feature of a slice owning ``size`` features per unit
    in each of ``parts`` blocks.

    >>> unit_index(torch.tensor([True, False]), 2, parts=2).tolist()
    [True, True, False, False, True, True, False, False]
    """
    return keep.repeat_interleave(size).repeat(parts)


def unit_features(values: Tensor, piece: UnitSlice, count: int) -> Tensor:
    """One value per feature along ``piece.dim`` regrouped per unit: ``[count, parts · size]``."""
    return values.reshape(piece.parts, count, piece.size).transpose(0, 1).reshape(count, -1)


def param_masks(group: UnitGroup, keep: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Boolean masks, shaped like the group's parameters (``shapes``), that zero the units ``keep`` drops."""
    masks = {}
    for piece in group.slices:
        shape = shapes[piece.param]
        view = [1] * len(shape)
        view[piece.dim] = -1
        masks[piece.param] = unit_index(keep, piece.size, piece.parts).view(view).expand(shape).clone()
    return masks


def magnitude_scores(group: UnitGroup, params: Mapping[str, Tensor]) -> Tensor:
    """The L2 norm of the weights (not biases) each unit owns: ``count`` values."""
    squares = torch.zeros(group.count, dtype=torch.float32, device=params[group.output].device)
    for piece in group.slices:
        if piece.param.endswith(".bias"):
            continue
        weight = params[piece.param].detach().float()
        per_feature = weight.pow(2).sum(dim=1 - piece.dim)
        squares += unit_features(per_feature, piece, group.count).sum(dim=1)
    return squares.sqrt()


def mask_gradient(group: UnitGroup, weight: Tensor, grad: Tensor) -> Tensor:
    """``dL/dm`` for a gate on each unit: ``W ⊙ dL/dW`` of the output projection summed over each unit's input
    features (columns of an ``nn.Linear`` weight, rows of a ``Conv1D`` one)."""
    piece = group.output_slice
    per_input = (weight.detach().float() * grad.float()).sum(dim=1 - piece.dim)
    return unit_features(per_input, piece, group.count).sum(dim=1)


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
