"""Intermediate-layer transfer: hidden-state MSE through learned projections, and attention-map KL.

``LayerTransfer`` holds the layer maps (student layer -> teacher layer) and, where widths differ, one
``nn.Linear(student_width, teacher_width)`` per mapped hidden layer. The projections train with the
student (the distillation callback adds them to its optimizer), live in the callback's checkpoint
state, and are not part of the student, so exports leave them out.

Hidden-state indices follow Hugging Face's ``hidden_states`` tuple (0 = embeddings, i = output of
layer i); attention indices are layers (0-based).

Example:
    >>> from transformers import BertConfig
    >>> transfer = LayerTransfer(hidden_layers={1: 2, 2: 4}, hidden_weight=1.0)
    >>> transfer.bind(BertConfig(hidden_size=32, num_hidden_layers=2), BertConfig(hidden_size=64, num_hidden_layers=4))
    >>> sorted(transfer.projections), transfer.projections["1"].weight.shape
    (['1', '2'], torch.Size([64, 32]))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memopt.distillation.losses import attention_kl, hidden_state_mse
from lightning_memopt.distillation.teacher import layer_count


def _layers(config: Any, who: str) -> int:
    counted = layer_count(config)
    if counted is None:
        raise ValueError(f"The {who}'s config has no num_hidden_layers; intermediate-layer transfer needs one.")
    return counted[1]


def _width(config: Any) -> int:
    return int(getattr(config, "hidden_size", None) or config.dim)


def check_layer_map(option: str, mapping: Mapping[int, int], student_count: int, teacher_count: int) -> None:
    """Every mapped index exists on its side (``*_count`` is the number of valid indices)."""
    for student_layer, teacher_layer in mapping.items():
        if not 0 <= int(student_layer) < student_count or not 0 <= int(teacher_layer) < teacher_count:
            raise ValueError(
                f"{option} maps {student_layer} -> {teacher_layer}, but the student has indices 0..{student_count - 1} "
                f"and the teacher 0..{teacher_count - 1} there."
            )


class LayerTransfer(nn.Module):
    """The intermediate-layer losses of a distillation run (see the module docstring).

    Args:
        hidden_layers: ``{student hidden-state index: teacher hidden-state index}``.
        hidden_weight: weight of the mean hidden-state MSE over the map.
        attention_layers: ``{student layer: teacher layer}`` for attention-distribution KL (same head count).
        attention_weight: weight of the mean attention KL over the map.
    """

    def __init__(
        self,
        hidden_layers: Mapping[int, int] | None = None,
        hidden_weight: float = 0.0,
        attention_layers: Mapping[int, int] | None = None,
        attention_weight: float = 0.0,
    ) -> None:
        super().__init__()
        for name, layers, weight in (
            ("hidden", hidden_layers, hidden_weight),
            ("attention", attention_layers, attention_weight),
        ):
            if weight < 0:
                raise ValueError(f"{name}_weight must be >= 0, got {weight}.")
            if weight > 0 and not layers:
                raise ValueError(f"{name}_weight > 0 needs {name}_layers, e.g. {{1: 2, 2: 4, 3: 6}}.")
        self.hidden_layers = {int(s): int(t) for s, t in (hidden_layers or {}).items()} if hidden_weight else {}
        self.attention_layers = (
            {int(s): int(t) for s, t in (attention_layers or {}).items()} if attention_weight else {}
        )
        self.hidden_weight = hidden_weight
        self.attention_weight = attention_weight
        self.projections = nn.ModuleDict()

    @property
    def active(self) -> bool:
        return bool(self.hidden_layers or self.attention_layers)

    def bind(self, student_config: Any, teacher_config: Any) -> None:
        """Check the maps against both models and create the projections (once)."""
        student_layers, teacher_layers = _layers(student_config, "student"), _layers(teacher_config, "teacher")
        check_layer_map("hidden_layers", self.hidden_layers, student_layers + 1, teacher_layers + 1)
        check_layer_map("attention_layers", self.attention_layers, student_layers, teacher_layers)
        student_width, teacher_width = _width(student_config), _width(teacher_config)
        if student_width != teacher_width and not len(self.projections):
            for student_layer in self.hidden_layers:
                self.projections[str(student_layer)] = nn.Linear(student_width, teacher_width)

    def forward(self, student_output: Any, teacher_output: Any, mask: Tensor | None) -> dict[str, Tensor]:
        """``{"hidden": ..., "attention": ...}`` for the active parts (unweighted means over the maps)."""
        losses = {}
        if self.hidden_layers:
            losses["hidden"] = torch.stack(
                [
                    hidden_state_mse(
                        student_output.hidden_states[s],
                        teacher_output.hidden_states[t],
                        self.projections[str(s)] if str(s) in self.projections else None,  # noqa: SIM401 (no ModuleDict.get)
                        mask,
                    )
                    for s, t in self.hidden_layers.items()
                ]
            ).mean()
        if self.attention_layers:
            losses["attention"] = torch.stack(
                [
                    attention_kl(student_output.attentions[s], teacher_output.attentions[t], mask)
                    for s, t in self.attention_layers.items()
                ]
            ).mean()
        return losses

    def weighted(self, losses: Mapping[str, Tensor]) -> Tensor | float:
        """``hidden_weight * hidden + attention_weight * attention`` (0.0 when inactive)."""
        return self.hidden_weight * losses.get("hidden", 0.0) + self.attention_weight * losses.get("attention", 0.0)
