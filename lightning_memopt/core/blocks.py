"""The repeated transformer blocks of a model: what FSDP shards, ZeRO checkpoints and the estimator gathers.

Found without knowing the architecture: the members of a ``ModuleList`` that share one class
(``BertLayer``, ``LlamaDecoderLayer``, GPT-2's ``GPT2Block``...), or the classes a user names.

Example:
    >>> from transformers import BertConfig, BertForTokenClassification
    >>> model = BertForTokenClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2))
    >>> [name for name, _ in transformer_blocks(model)]
    ['bert.encoder.layer.0', 'bert.encoder.layer.1', 'bert.encoder.layer.2']
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def transformer_blocks(model: nn.Module, block_classes: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks to shard one by one: modules of the named classes, or the members of uniform ``ModuleList`` s."""
    if block_classes:
        found = [(n, m) for n, m in model.named_modules() if type(m).__name__ in set(block_classes)]
        if not found:
            present = sorted({type(m).__name__ for m in model.modules()})[:20]
            raise ValueError(f"block_classes={list(block_classes)} match no module; the model has {present}.")
        return found
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            found += [(f"{name}.{index}", block) for index, block in enumerate(module)]
    return found


def required_blocks(
    model: nn.Module, block_classes: Sequence[str] | None, needed_by: str
) -> list[tuple[str, nn.Module]]:
    """:func:`transformer_blocks`, or an error saying that ``needed_by`` needs them and how to name them."""
    blocks = transformer_blocks(model, block_classes)
    if not blocks:
        raise ValueError(
            f"{needed_by} found no transformer blocks in {type(model).__name__} (no ModuleList of identical blocks); "
            "pass block_classes=['YourBlockClass']."
        )
    return blocks
