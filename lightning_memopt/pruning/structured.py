"""Structured pruning of feed-forward neurons, with physical removal that plain ``transformers`` loads.

Each transformer block's feed-forward network is a pair of Linear layers, ``up`` (hidden → intermediate)
and ``down`` (intermediate → hidden). Removing neuron ``j`` deletes row ``j`` of ``up`` (and its bias)
and column ``j`` of ``down``; the output is exactly that of the model with the neuron's activation set
to zero. Keeping the same number of neurons in every block lets the smaller model be described by
``config.intermediate_size`` (``hidden_dim`` for DistilBERT), so ``from_pretrained`` loads it.

Attention heads are not removed physically here: transformers 5 dropped ``prune_heads`` and
``config.pruned_heads``, and BERT-style configs cannot express fewer heads of the same width.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    >>> shrink_ffn(model, ffn_neuron_scores(model), keep=0.5).config.intermediate_size
    32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# (block class attribute path to the up projection, to the down projection, config field)
FFN_LAYOUTS = (
    ("intermediate.dense", "output.dense", "intermediate_size"),  # BERT, RoBERTa, ELECTRA, XLM-R, MPNet
    ("ffn.lin1", "ffn.lin2", "hidden_dim"),  # DistilBERT
)


@dataclass(frozen=True)
class FeedForward:
    """One block's feed-forward pair."""

    block: str
    up: nn.Linear
    down: nn.Linear
    up_path: str
    down_path: str
    config_field: str


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_feed_forwards(model: nn.Module) -> list[FeedForward]:
    """The feed-forward pairs of every transformer block, in order; an error if the layout is unknown."""
    found = []
    for name, module in model.named_modules():
        for up_path, down_path, field in FFN_LAYOUTS:
            up, down = _get(module, up_path), _get(module, down_path)
            if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features:
                found.append(FeedForward(name, up, down, up_path, down_path, field))
    if not found:
        raise ValueError(
            f"No feed-forward blocks found in {type(model).__name__}; known layouts are "
            f"{[(u, d) for u, d, _ in FFN_LAYOUTS]}."
        )
    return found


def ffn_neuron_scores(model: nn.Module) -> dict[str, Tensor]:
    """Magnitude importance of each intermediate neuron: ‖row of up‖ · ‖column of down‖, per block."""
    scores = {}
    for ffn in find_feed_forwards(model):
        up_norm = ffn.up.weight.detach().float().norm(dim=1)
        down_norm = ffn.down.weight.detach().float().norm(dim=0)
        scores[ffn.block] = up_norm * down_norm
    return scores


def _slice_linear(layer: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the kept output (dim 0) or input (dim 1) features."""
    weight = layer.weight.detach().index_select(dim, keep).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if dim == 1 else layer.bias.detach().index_select(0, keep))
    return new


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attribute, new)


def shrink_ffn(model: nn.Module, scores: dict[str, Tensor], keep: float) -> nn.Module:
    """Keep the ``keep`` fraction of highest-scoring neurons in every block (the same count everywhere).

    Modifies ``model`` in place and updates its ``config`` so ``save_pretrained`` writes a loadable folder.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1] (the fraction of feed-forward neurons kept), got {keep}.")
    feed_forwards = find_feed_forwards(model)
    width = feed_forwards[0].up.out_features
    kept = max(1, round(keep * width))
    for ffn in feed_forwards:
        if ffn.up.out_features != width:
            raise ValueError(
                f"Block {ffn.block} has {ffn.up.out_features} neurons, not {width}; cannot shrink uniformly."
            )
        order = torch.argsort(scores[ffn.block], descending=True, stable=True)[:kept]
        index = torch.sort(order).values.to(ffn.up.weight.device)
        prefix = f"{ffn.block}." if ffn.block else ""
        _replace(model, prefix + ffn.up_path, _slice_linear(ffn.up, index, dim=0))
        _replace(model, prefix + ffn.down_path, _slice_linear(ffn.down, index, dim=1))
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, feed_forwards[0].config_field, kept)
    return model
