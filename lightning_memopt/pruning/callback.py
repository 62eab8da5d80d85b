"""``PruningScheduler``: gradual magnitude pruning of any LightningModule, resumable and exact.

The callback owns the masks (its ``state_dict`` goes into every checkpoint), so the module itself
is unchanged: no mask buffers, no re-parametrisation, and a pruned checkpoint loads into the plain
module. Each optimizer step it

1. raises the masks to the schedule's sparsity when the schedule says so (lowest |w| pruned, per
   layer or globally; weights already pruned stay pruned) and zeroes the pruned weights and their
   optimizer state (Adam's moments);
2. zeroes pruned gradients before the optimizer sees them and re-applies the masks after the step,
   so pruned weights stay exactly zero (weight decay and momentum included).

Example:
    >>> from lightning.pytorch import Trainer
    >>> pruning = PruningScheduler(final_sparsity=0.8, start=0.0, end=0.7)
    >>> trainer = Trainer(callbacks=[pruning])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_memopt.pruning.masks import global_masks, layerwise_masks, mask_sparsity
from lightning_memopt.pruning.schedules import ResolvedSchedule, ScheduleKind, SparsitySchedule, sparsity_at
from lightning_memopt.pruning.selection import ModuleFilter, as_filter, select_weights

log = logging.getLogger("lightning_memopt")


SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def refuse_sharded_strategies(trainer: Trainer, callback: str) -> None:
    """Stop at setup, with what to use instead, on strategies whose sharded weights this callback cannot mask yet."""
    name = type(trainer.strategy).__name__
    if any(base.__name__ in SHARDED_STRATEGIES for base in type(trainer.strategy).__mro__):
        raise ValueError(
            f"{callback} does not support {name} yet: it masks full weight matrices, which sharded strategies split "
            "across ranks. Use --trainer.strategy ddp (or a single device); sharded-strategy support is planned."
        )


class PruningScheduler(Callback):
    """Prune the selected weights of any LightningModule on a sparsity schedule.

    Args:
        final_sparsity: fraction of the selected weights that are zero at the end, in [0, 1).
        schedule: ``"cubic"`` (Zhu & Gupta gradual magnitude pruning), ``"linear"`` or ``"constant"``.
        initial_sparsity: sparsity applied when the schedule starts.
        start / end / every: schedule start, end and update interval, in optimizer steps (int) or as
            fractions of the run (float in [0, 1]).
        scope: ``"layer"`` prunes each layer to the target; ``"global"`` ranks all selected weights together.
        criterion: ``"magnitude"`` ranks by |w|; ``"movement"`` by first-order movement scores
            ``-sum_t w_t * dL/dw_t`` accumulated over the run (Sanh et al., 2020), which keeps the weights
            that fine-tuning moves away from zero.
        plot_path: where to write a PNG of the schedule and the per-layer sparsity when fit ends
            (needs matplotlib).
        modules: which layers: ``None`` for the encoder's Linear layers (not embeddings, pooler or heads),
            a list of regular expressions matched against module names, or a ``(module, name) -> bool`` callable.
    """

    def __init__(
        self,
        final_sparsity: float = 0.8,
        schedule: ScheduleKind = "cubic",
        initial_sparsity: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 0.7,
        every: int | float = 0.01,
        scope: Literal["layer", "global"] = "layer",
        criterion: Literal["magnitude", "movement"] = "magnitude",
        modules: Sequence[str] | ModuleFilter | None = None,
        plot_path: str | None = None,
    ) -> None:
        self.plan = SparsitySchedule(final_sparsity, schedule, initial_sparsity, start, end, every)
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
        self.scope = scope
        if criterion not in ("magnitude", "movement"):
            raise ValueError(f"criterion must be 'magnitude' or 'movement', got {criterion!r}.")
        self.criterion = criterion
        self.movement: dict[str, Tensor] = {}
        self.plot_path = plot_path
        self.history: list[tuple[int, float]] = []
        self.module_filter = as_filter(modules)
        self.masks: dict[str, Tensor] = {}
        self.sparsity = 0.0
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.run: ResolvedSchedule | None = None

    # -- state that goes into checkpoints ------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "movement": {name: score.cpu() for name, score in self.movement.items()},
            "sparsity": self.sparsity,
            "history": [list(point) for point in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self.movement = dict(state_dict.get("movement", {}))
        self.sparsity = float(state_dict["sparsity"])
        self.history = [(int(step), float(value)) for step, value in state_dict.get("history", [])]

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategies(trainer, type(self).__name__)
        self.weights = select_weights(pl_module, self.module_filter)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run = self.plan.resolve(int(trainer.estimated_stepping_batches))
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
            self.masks = {name: mask.to(self.weights[name].device) for name, mask in self.masks.items()}
            self._apply_masks(trainer)
        self.movement = (
            {
                name: self.movement[name].to(weight.device)
                if name in self.movement
                else torch.zeros_like(weight, dtype=torch.float32)
                for name, weight in self.weights.items()
            }
            if self.criterion == "movement"
            else {}
        )
        rank_zero_info(
            f"PruningScheduler: {len(self.weights)} weight matrices ({self._selected_numel():,} weights), "
            f"{self.run.kind} schedule to {self.run.final_sparsity:.0%} from step {self.run.start_step} "
            f"to {self.run.end_step}, every {self.run.every_steps} steps, {self.scope} ranking."
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
        for name, mask in self.masks.items():
            grad = self.weights[name].grad
            if grad is not None:
                grad.mul_(mask)
        for name, score in self.movement.items():
            weight = self.weights[name]
            if weight.grad is not None:  # gradients are already averaged across DDP ranks here
                score.sub_(weight.detach().float() * weight.grad.float())

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
    def _selected_numel(self) -> int:
        return sum(weight.numel() for weight in self.weights.values())

    def _update_masks(self, target: float, trainer: Trainer) -> None:
        if self.criterion == "movement":
            scores = {name: score.clone() for name, score in self.movement.items()}
        else:
            scores = {name: weight.detach().abs().float() for name, weight in self.weights.items()}
        for name, mask in self.masks.items():  # pruned weights stay pruned
            scores[name][~mask] = float("-inf")
        make = layerwise_masks if self.scope == "layer" else global_masks
        masks = make(scores, target)
        # Every rank holds the same weights under DDP; rank 0's masks are made authoritative anyway.
        self.masks = trainer.strategy.broadcast(masks, src=0)
        self.sparsity = target
        self.history.append((trainer.global_step, target))
        self._apply_masks(trainer)
        log.info("step %d: sparsity %.4f (measured %.4f)", trainer.global_step, target, mask_sparsity(self.masks))

    @torch.no_grad()
    def _mask_weights(self) -> None:
        """Zero the pruned weights (after every optimizer step)."""
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)

    def _apply_masks(self, trainer: Trainer) -> None:
        """Zero pruned weights and their optimizer state (e.g. Adam's moments)."""
        self._mask_weights()
        with torch.no_grad():
            for name, mask in self.masks.items():
                weight = self.weights[name]
                for optimizer in trainer.optimizers:
                    for value in optimizer.state.get(weight, {}).values():
                        # Quantized states (bitsandbytes' uint8 codes) are left alone: code 0 is not 0.0.
                        if isinstance(value, Tensor) and value.shape == weight.shape and value.is_floating_point():
                            value.mul_(mask)

    def layer_sparsities(self) -> dict[str, float]:
        """Measured fraction of zeros in each selected weight."""
        return {name: float((weight == 0).float().mean()) for name, weight in self.weights.items()}

    def sparsity_table(self) -> str:
        """A per-layer table of measured sparsity, with the total over all selected weights."""
        rows = self.layer_sparsities()
        width = max(len(name) for name in rows)
        zeros = sum(int((w == 0).sum()) for w in self.weights.values())
        lines = [f"{'layer':<{width}}  sparsity", *(f"{n:<{width}}  {s:8.4f}" for n, s in rows.items())]
        lines.append(f"{'total':<{width}}  {zeros / self._selected_numel():8.4f}")
        return "\n".join(lines)
