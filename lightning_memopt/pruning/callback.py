"""``PruningScheduler``: gradual unstructured or structured pruning of any LightningModule, resumable and exact.

The callback owns the masks (its ``state_dict`` goes into every checkpoint), so the module itself
is unchanged: no mask buffers, no re-parametrisation, and a pruned checkpoint loads into the plain
module. Each optimizer step it

1. raises the masks to the schedule's sparsity when the schedule says so and zeroes the pruned
   weights and their optimizer state (Adam's moments); weights already pruned stay pruned;
2. zeroes pruned gradients before the optimizer sees them and re-applies the masks after the step,
   so pruned weights stay exactly zero (weight decay and momentum included).

Unstructured pruning ranks single weights (``magnitude`` |w| or ``movement`` scores), per layer or
globally. Structured pruning (``structure="heads"``, ``"neurons"`` or ``"heads_and_neurons"``) ranks
whole attention heads and feed-forward neurons (``magnitude`` or ``gradient`` of a unit mask) and
prunes the same fraction in every layer, so :func:`~lightning_memopt.pruning.shrink_pruned` can cut
them out of the exported model. The sparsity of a structured run is the fraction of units removed.

Works on one device, under DDP (masks are decided on rank 0 and broadcast) and under
``ModelParallelStrategy`` (FSDP2: scores are computed on gathered full tensors and masks sharded like
their parameters).

Example:
    >>> from lightning.pytorch import Trainer
    >>> pruning = PruningScheduler(final_sparsity=0.8, start=0.0, end=0.7)
    >>> heads_and_neurons = PruningScheduler(final_sparsity=0.5, structure="heads_and_neurons", criterion="gradient", start=0.1)
    >>> trainer = Trainer(callbacks=[pruning])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_memopt.core.filters import ModuleFilter, as_filter, select_weights
from lightning_memopt.core.strategies import refuse_strategies
from lightning_memopt.pruning.masks import global_masks, layerwise_masks, mask_sparsity
from lightning_memopt.pruning.placement import full, place_like
from lightning_memopt.pruning.schedules import ResolvedSchedule, ScheduleKind, SparsitySchedule, sparsity_at
from lightning_memopt.pruning.units import (
    UnitGroup,
    find_unit_groups,
    keep_top_units,
    magnitude_scores,
    mask_gradient,
    param_masks,
    units_to_prune,
)

log = logging.getLogger("lightning_memopt")

Structure = Literal["unstructured", "heads", "neurons", "heads_and_neurons"]
CRITERIA = {"unstructured": ("magnitude", "movement"), "structured": ("magnitude", "gradient")}
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")


class PruningScheduler(Callback):
    """Prune the selected weights (or heads and neurons) of any LightningModule on a sparsity schedule.

    Args:
        final_sparsity: fraction of the selected weights (or units) that are zero at the end, in [0, 1).
        schedule: ``"cubic"`` (Zhu & Gupta gradual magnitude pruning), ``"linear"`` or ``"constant"``.
        initial_sparsity: sparsity applied when the schedule starts.
        start / end / every: schedule start, end and update interval, in optimizer steps (int) or as
            fractions of the run (float in [0, 1]).
        structure: ``"unstructured"`` (single weights), or ``"heads"``, ``"neurons"``,
            ``"heads_and_neurons"`` (attention heads and feed-forward neurons, the same fraction per layer).
        scope: ``"layer"`` prunes each layer to the target; ``"global"`` ranks all selected weights together
            (unstructured only).
        criterion: unstructured: ``"magnitude"`` ranks by |w|; ``"movement"`` by first-order movement scores
            ``-sum_t w_t * dL/dw_t`` accumulated over the run (Sanh et al., 2020); start it after a warm-up
            (``start=0.1`` or later): from step 0 a 600-step CoNLL-2003 run pruned to 80 % never learned
            (docs/results/notes/pruning-600.md). Structured:
            ``"magnitude"`` ranks units by the norm of their weights; ``"gradient"`` by ``|dL/dm|`` for a mask
            ``m`` on each unit, accumulated over steps (Michel et al., 2019), so start the schedule after
            some steps (``start > 0``) to give the scores data.
        modules: which layers: ``None`` for the encoder's Linear layers (not embeddings, pooler or heads),
            a list of regular expressions matched against module names, or a ``(module, name) -> bool``
            callable. For structured pruning it is matched against each unit group's output projection
            (e.g. ``encoder.layer.3.output.dense``).
        plot_path: where to write a PNG of the schedule and the per-layer sparsity when fit ends
            (needs matplotlib).
    """

    def __init__(
        self,
        final_sparsity: float = 0.8,
        schedule: ScheduleKind = "cubic",
        initial_sparsity: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 0.7,
        every: int | float = 0.01,
        structure: Structure = "unstructured",
        scope: Literal["layer", "global"] = "layer",
        criterion: Literal["magnitude", "movement", "gradient"] = "magnitude",
        modules: Sequence[str] | ModuleFilter | None = None,
        plot_path: str | None = None,
    ) -> None:
        self.plan = SparsitySchedule(final_sparsity, schedule, initial_sparsity, start, end, every)
        if structure not in ("unstructured", "heads", "neurons", "heads_and_neurons"):
            raise ValueError(
                f"structure must be 'unstructured', 'heads', 'neurons' or 'heads_and_neurons', got {structure!r}."
            )
        self.structure = structure
        kind = "unstructured" if structure == "unstructured" else "structured"
        if criterion not in CRITERIA[kind]:
            raise ValueError(
                f"criterion must be {' or '.join(repr(c) for c in CRITERIA[kind])} for {kind} pruning, got {criterion!r}."
            )
        self.criterion = criterion
        if criterion in ("movement", "gradient") and start == 0:
            rank_zero_warn(
                f"PruningScheduler(criterion={criterion!r}, start=0): this criterion ranks by scores accumulated "
                "during training, so the first pruning steps would rank on a few batches of data and can remove "
                "what the model needs (movement from step 0 to 80 % left a 600-step CoNLL-2003 run at F1 0.0). "
                "Start after a warm-up, e.g. start=0.1."
            )
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
        if scope == "global" and kind == "structured":
            raise ValueError(
                "scope='global' works for unstructured pruning only: structured pruning removes the same number of "
                "heads and neurons from every layer, so the exported model keeps a uniform config. Use scope='layer'."
            )
        self.scope = scope
        self.module_filter = as_filter(modules)
        self.plot_path = plot_path
        # State that goes into checkpoints (full tensors, the same on every rank).
        self.masks: dict[str, Tensor] = {}  # parameter name -> bool mask (True = kept)
        self.kept_units: dict[str, Tensor] = {}  # unit group name -> bool per head/neuron (structured)
        self.importance: dict[str, Tensor] = {}  # accumulated movement (per weight) or mask gradient (per unit)
        self.sparsity = 0.0
        self.history: list[tuple[int, float]] = []
        # Bound at fit start.
        self.weights: dict[str, nn.Parameter] = {}
        self.groups: dict[str, UnitGroup] = {}
        self.placed: dict[str, Tensor] = {}  # masks on the parameters' devices, sharded like them
        self.run: ResolvedSchedule | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(structure=self.structure)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "kept_units": {name: keep.cpu() for name, keep in self.kept_units.items()},
            "importance": {name: full(score).cpu() for name, score in self.importance.items()},
            "sparsity": self.sparsity,
            "history": [list(point) for point in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self.kept_units = dict(state_dict.get("kept_units", {}))
        self.importance = dict(state_dict.get("importance", {}))
        self.sparsity = float(state_dict["sparsity"])
        self.history = [(int(step), float(value)) for step, value in state_dict.get("history", [])]

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_strategies(
                trainer,
                type(self).__name__,
                UNSUPPORTED_STRATEGIES,
                "it flattens parameters into shards that cannot be masked per weight",
                "--trainer.strategy ddp, or ModelParallelStrategy (FSDP2, per-parameter sharding) for sharded training",
            )
            self._select(pl_module)  # a filter that matches nothing fails here, before any training

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run = self.plan.resolve(int(trainer.estimated_stepping_batches))
        self._select(pl_module)  # again: sharding strategies replace the parameters after setup
        if self.masks:  # restored from a checkpoint
            missing, unexpected = (
                sorted(set(self.weights) - set(self.masks)),
                sorted(set(self.masks) - set(self.weights)),
            )
            if missing or unexpected:
                raise ValueError(
                    "The checkpoint was pruned with other layers than the current `modules` filter selects: "
                    f"not in the checkpoint {missing}, only in the checkpoint {unexpected}. Use the same filter to resume."
                )
            self._place_and_apply(trainer)
        self._init_importance()
        what = f"{len(self.weights)} weight matrices ({self._selected_numel():,} weights)"
        if self.groups:
            heads = sum(g.count for g in self.groups.values() if g.kind == "head")
            neurons = sum(g.count for g in self.groups.values() if g.kind == "neuron")
            what = f"{heads} attention heads and {neurons} feed-forward neurons in {len(self.groups)} groups"
        rank_zero_info(
            f"PruningScheduler: {what}, {self.run.kind} schedule to {self.run.final_sparsity:.0%} from step "
            f"{self.run.start_step} to {self.run.end_step}, every {self.run.every_steps} steps, "
            f"{self.criterion} ranking{' per layer' if self.scope == 'layer' else ' across layers'}."
        )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.run is not None
        target = sparsity_at(trainer.global_step, self.run)
        if target > self.sparsity:
            self._update_masks(target, trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients are already averaged across DDP ranks (and reduce-scattered under FSDP2) here.
        for name, mask in self.placed.items():
            grad = self.weights[name].grad
            if grad is not None:
                grad.mul_(mask)
        if self.criterion == "movement":
            for name, score in self.importance.items():
                weight = self.weights[name]
                if weight.grad is not None:
                    score.sub_(weight.detach().float() * weight.grad.float())
        elif self.criterion == "gradient":
            for name, group in self.groups.items():
                weight = self.weights[group.output]
                if weight.grad is not None:
                    self.importance[name] += mask_gradient(group, full(weight), full(weight.grad)).abs().cpu()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._mask_weights()
        pl_module.log("sparsity", self.sparsity, on_step=True, on_epoch=False, prog_bar=True)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(self.sparsity_table())
        if self.plot_path and trainer.is_global_zero and self.run is not None:
            from lightning_memopt.pruning.plot import plot_pruning

            written = plot_pruning(self.plot_path, self.run, self.history, self.layer_sparsities())
            rank_zero_info(f"PruningScheduler: plot written to {written}")

    # -- the work ----------------------------------------------------------------------------
    def _select(self, pl_module: LightningModule) -> None:
        """Bind the parameters to mask: the filtered weights, or every parameter the unit groups own."""
        if self.structure == "unstructured":
            self.weights = select_weights(pl_module, self.module_filter)
            return
        every_group = find_unit_groups(pl_module, self.structure)
        projections = {group.name: group.output.removesuffix(".weight") for group in every_group}
        groups = [
            g
            for g in every_group
            if self.module_filter(pl_module.get_submodule(projections[g.name]), projections[g.name])
        ]
        if not groups:
            raise ValueError(
                f"The modules filter selects none of the {self.structure.replace('_', ' and ')} of "
                f"{type(pl_module).__name__}: it is matched against output projections such as "
                f"{projections[every_group[0].name]!r}."
            )
        self.groups = {group.name: group for group in groups}
        params = dict(pl_module.named_parameters())
        self.weights = {name: params[name] for group in groups for name in group.params}

    def _selected_numel(self) -> int:
        return sum(weight.numel() for weight in self.weights.values())

    def _init_importance(self) -> None:
        if self.criterion == "movement":
            self.importance = {
                name: place_like(self.importance[name], weight)
                if name in self.importance
                else torch.zeros_like(weight, dtype=torch.float32)
                for name, weight in self.weights.items()
            }
        elif self.criterion == "gradient":
            self.importance = {
                name: self.importance.get(name, torch.zeros(group.count)).float().cpu()
                for name, group in self.groups.items()
            }

    def _update_masks(self, target: float, trainer: Trainer) -> None:
        if self.groups:
            self.kept_units, masks = self._unit_masks(target)
        else:
            masks = self._weight_masks(target)
        # Every rank holds the same weights under DDP; rank 0's masks are made authoritative anyway.
        self.masks, self.kept_units = trainer.strategy.broadcast((masks, self.kept_units), src=0)
        self.sparsity = target
        self.history.append((trainer.global_step, target))
        self._place_and_apply(trainer)
        log.info("step %d: sparsity %.4f (measured %.4f)", trainer.global_step, target, mask_sparsity(self.masks))

    def _weight_masks(self, target: float) -> dict[str, Tensor]:
        if self.criterion == "movement":
            scores = {name: full(score).clone() for name, score in self.importance.items()}
        else:
            scores = {name: full(weight.detach()).abs().float() for name, weight in self.weights.items()}
        for name, mask in self.masks.items():  # pruned weights stay pruned
            scores[name][~mask.to(scores[name].device)] = float("-inf")
        return (layerwise_masks if self.scope == "layer" else global_masks)(scores, target)

    def _unit_masks(self, target: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        shapes = {name: weight.shape for name, weight in self.weights.items()}
        kept_units, masks = {}, {}
        for name, group in self.groups.items():
            if self.criterion == "gradient":
                scores = self.importance[name]
            else:
                scores = magnitude_scores(group, {p: full(self.weights[p]) for p in group.params}).cpu()
            kept = self.kept_units.get(name, torch.ones(group.count, dtype=torch.bool))
            kept_units[name] = keep_top_units(scores, kept, units_to_prune(group.count, target))
            masks.update(param_masks(group, kept_units[name], shapes))
        return kept_units, masks

    def _place_and_apply(self, trainer: Trainer) -> None:
        self.masks = {name: mask.cpu() for name, mask in self.masks.items()}
        self.placed = {name: place_like(mask, self.weights[name]) for name, mask in self.masks.items()}
        self._apply_masks(trainer)

    @torch.no_grad()
    def _mask_weights(self) -> None:
        """Zero the pruned weights (after every optimizer step)."""
        for name, mask in self.placed.items():
            self.weights[name].mul_(mask)

    def _apply_masks(self, trainer: Trainer) -> None:
        """Zero pruned weights and their optimizer state (e.g. Adam's moments)."""
        self._mask_weights()
        with torch.no_grad():
            for name, mask in self.placed.items():
                weight = self.weights[name]
                for optimizer in trainer.optimizers:
                    for value in optimizer.state.get(weight, {}).values():
                        # Quantized states (bitsandbytes' uint8 codes) are left alone: code 0 is not 0.0.
                        if isinstance(value, Tensor) and value.shape == weight.shape and value.is_floating_point():
                            value.mul_(mask)

    def layer_sparsities(self) -> dict[str, float]:
        """Measured fraction of zeros in each selected weight, or of units pruned in each group (structured)."""
        if self.groups:
            return {name: 1.0 - float(keep.float().mean()) for name, keep in self.kept_units.items()}
        return {name: float((full(weight) == 0).float().mean()) for name, weight in self.weights.items()}

    def sparsity_table(self) -> str:
        """A per-layer table of measured sparsity, with the total over all selected weights."""
        rows = self.layer_sparsities()
        if not rows:
            return "PruningScheduler: nothing pruned yet."
        width = max(len(name) for name in rows)
        zeros = sum(int((full(w) == 0).sum()) for w in self.weights.values())
        lines = [f"{'layer':<{width}}  sparsity", *(f"{n:<{width}}  {s:8.4f}" for n, s in rows.items())]
        lines.append(f"{'total':<{width}}  {zeros / self._selected_numel():8.4f}")
        return "\n".join(lines)
