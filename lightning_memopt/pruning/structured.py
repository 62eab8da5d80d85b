"""Cut structurally pruned heads and neurons out of a model, so it is smaller and faster.

After structured pruning the pruned units' weights are exactly zero (see :mod:`.units`).
:func:`shrink_pruned` finds those all-zero units and slices them out of the linear layers (``nn.Linear``, or
``Conv1D`` for GPT-2, replaced by smaller ones of the same kind):

- **Feed-forward neurons** are removed when every block keeps the same number, and the config's
  ``intermediate_size`` (``hidden_dim`` for DistilBERT, ``n_inner`` for GPT-2) is updated, so
  ``save_pretrained`` writes a folder that plain ``transformers`` loads.
- **Attention heads** are removed with ``heads=True`` (whole key/value groups under grouped-query attention).
  When a Llama-style config can say it (every layer keeps the same number of groups), its
  ``num_key_value_heads`` and ``num_attention_heads`` are updated and plain ``from_pretrained`` reloads the
  model. Otherwise: transformers 5 dropped ``prune_heads`` and
  ``config.pruned_heads``, and a BERT config cannot express fewer heads in some layers, so the kept
  count of every shrunk group is recorded in the config under ``memopt_shrunk``
  (``{"heads": {group: kept}, "neurons": {group: kept}}``): :func:`apply_recorded_shrink` rebuilds
  those shapes, and ``lightning_memopt.load_pretrained(folder)`` reloads such a folder from itself.
  Plain ``from_pretrained`` refuses it (the attention weights do not fit the config), never loading
  it silently with the full shape. GPT-2 always takes this way (its head size is ``n_embd / n_head``, so
  its config cannot say fewer heads); cutting its heads also updates the attention block's ``num_heads``
  and ``split_size`` (the width its forward splits ``c_attn``'s ``q|k|v`` output by).

The shrunk model computes exactly what the masked model computes.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    >>> with torch.no_grad():
    ...     for layer in model.encoder.layer:  # what structured pruning leaves behind: neurons 32-63 zeroed
    ...         layer.intermediate.dense.weight[32:] = 0
    ...         layer.intermediate.dense.bias[32:] = 0
    ...         layer.output.dense.weight[:, 32:] = 0
    >>> shrink_pruned(model).neurons_kept, model.config.intermediate_size
    (32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_memopt.core.filters import conv1d_class, output_dim
from lightning_memopt.pruning.units import UnitGroup, find_unit_groups, unit_features, unit_index

SHRUNK_KEY = "memopt_shrunk"  # config.json: {"heads": {group: kept}, "neurons": {group: kept}}
FFN_WIDTH_FIELDS = ("hidden_dim", "n_inner")  # DistilBERT, GPT-2; else intermediate_size


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink_pruned` removed: units kept per layer, and the parameter counts."""

    neurons_kept: int | None  # per block, when neurons were removed
    heads_kept: dict[str, int]  # per attention block, when heads were removed
    params_before: int
    params_after: int


def zero_units(group: UnitGroup, params: dict[str, Tensor]) -> Tensor:
    """One bool per unit: True where every weight and bias slice the unit owns is exactly zero."""
    zero = torch.ones(group.count, dtype=torch.bool)
    for piece in group.slices:
        tensor = params[piece.param].detach()
        nonzero = tensor.ne(0) if tensor.dim() == 1 else tensor.ne(0).any(dim=1 - piece.dim)
        zero &= ~unit_features(nonzero, piece, group.count).any(dim=1).cpu()
    return zero


def _slice_linear(layer: nn.Module, keep: Tensor, dim: int) -> nn.Module:
    """A new ``nn.Linear`` (or ``Conv1D``) with only the kept features along the weight's ``dim``."""
    weight = layer.weight.detach().index_select(dim, keep).clone()
    if isinstance(layer, nn.Linear):
        out_features, in_features = weight.shape
        new = nn.Linear(
            in_features, out_features, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype
        )
    else:  # Conv1D: weight [in, out], always a bias
        in_features, out_features = weight.shape
        new = conv1d_class()(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(
                layer.bias.detach() if dim != output_dim(layer) else layer.bias.detach().index_select(0, keep)
            )
    return new


def remove_units(model: nn.Module, group: UnitGroup, keep: Tensor) -> None:
    """Slice the units ``keep`` drops out of every linear layer the group spans, and set the attributes counting
    them (GPT-2's ``num_heads``, ``split_size``) to the kept values (in place)."""
    for piece in group.slices:
        if piece.param.endswith(".bias"):
            continue  # sliced together with its weight
        path = piece.param.removesuffix(".weight")
        linear = model.get_submodule(path)
        index = unit_index(keep, piece.size, piece.parts).nonzero().squeeze(1)
        model.set_submodule(path, _slice_linear(linear, index.to(linear.weight.device), piece.dim))
    kept = int(keep.sum())
    for path, per_unit in group.attributes:
        owner, _, attribute = path.rpartition(".")
        setattr(model.get_submodule(owner), attribute, kept * per_unit)


def shrink_pruned(model: nn.Module, heads: bool = False) -> ShrinkReport:
    """Remove all-zero feed-forward neurons (and, with ``heads=True``, all-zero attention heads) in place.

    Neurons are removed only if every block keeps the same number; otherwise an error says so.
    """
    before = sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    neurons = find_unit_groups(model, "neurons")
    keeps = [~zero_units(group, params) for group in neurons]
    counts = {int(keep.sum()) for keep in keeps}
    if len(counts) > 1:
        raise ValueError(
            f"Blocks keep different numbers of feed-forward neurons ({sorted(counts)}); a config can only describe "
            "one intermediate size. Prune with PruningScheduler(structure=..., scope='layer')."
        )
    neurons_kept = counts.pop()
    for group, keep in zip(neurons, keeps, strict=True):
        remove_units(model, group, keep)
    config = getattr(model, "config", None)
    if config is not None:
        field = next((name for name in FFN_WIDTH_FIELDS if hasattr(config, name)), "intermediate_size")
        setattr(config, field, neurons_kept)
    heads_kept = {}
    if heads:
        groups = find_unit_groups(model, "heads")
        params = dict(model.named_parameters())
        for group in groups:
            keep = ~zero_units(group, params)
            if keep.all():
                continue
            remove_units(model, group, keep)
            heads_kept[group.name] = int(keep.sum())
        if heads_kept and _config_holds_heads(config, groups, heads_kept):
            heads_kept = {}  # the config says it: plain from_pretrained rebuilds the shapes
    if config is not None and heads_kept:
        recorded = dict(getattr(config, SHRUNK_KEY, None) or {})
        recorded["heads"] = {**recorded.get("heads", {}), **heads_kept}
        setattr(config, SHRUNK_KEY, recorded)
    return ShrinkReport(neurons_kept, heads_kept, before, sum(p.numel() for p in model.parameters()))


def _config_holds_heads(config: object, groups: list[UnitGroup], kept: dict[str, int]) -> bool:
    """Under grouped-query attention with the same key/value groups kept in every layer, write the new head counts
    into the config (``num_key_value_heads``, ``num_attention_heads``) and say so; else leave it."""
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(getattr(config, "num_key_value_heads", None), int) or not isinstance(head_dim, int):
        return False
    counts = {kept.get(group.name, group.count) for group in groups}
    if len(counts) != 1:
        return False
    groups_kept = counts.pop()
    config.num_attention_heads = groups_kept * (groups[0].size // head_dim)
    config.num_key_value_heads = groups_kept
    return True


def apply_recorded_shrink(model: nn.Module, recorded: dict) -> None:
    """Give a freshly built full-size ``model`` the shapes a shrunk model recorded (weights are loaded next)."""
    for kind, key in (("heads", "heads"), ("neurons", "neurons")):
        counts = recorded.get(key, {})
        groups = {group.name: group for group in find_unit_groups(model, kind)}
        unknown = sorted(set(counts) - set(groups))
        if unknown:
            raise ValueError(f"config.json's {SHRUNK_KEY} names {kind} groups this model does not have: {unknown}.")
        for name, kept in counts.items():
            group = groups[name]
            if not 0 < kept <= group.count:
                raise ValueError(f"config.json's {SHRUNK_KEY} keeps {kept} of {group.count} {kind} in {name}.")
            remove_units(model, group, torch.arange(group.count) < kept)
