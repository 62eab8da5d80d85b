"""Training order that survives an interruption: the same batches, in the same order, after a resume.

Lightning restores model, optimizer, scheduler and loop counters from a checkpoint, but a plain
shuffled ``DataLoader`` starts the interrupted epoch again from its first batch (some batches are seen
twice, others never). :class:`ResumableShuffleSampler` shuffles with ``seed + epoch`` (as
``DistributedSampler`` does, so each rank gets its own shard and Lightning leaves it in place under DDP)
and can start an epoch part-way through; :func:`batches_done_this_epoch` reads how far the restored
run got.

Example:
    >>> sampler = ResumableShuffleSampler(list(range(10)), seed=0)
    >>> full = list(sampler)
    >>> sampler.resume(epoch=0, samples_done=4)
    >>> list(sampler) == full[4:]
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


class ResumableShuffleSampler(DistributedSampler):
    """Seeded per-epoch shuffling split across ranks, able to skip the samples already trained on.

    The position to resume from is either given (:meth:`resume`) or asked for when the first pass
    starts (:meth:`resume_when_iterated`): Lightning may build the training loader before it restores
    the checkpoint (to count the steps of a run for the learning-rate schedule), so the restored
    progress is only known by the time batches are drawn.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.resume_epoch = -1
        self.samples_done = 0
        self.progress: Callable[[], tuple[int, int]] | None = None

    def resume(self, epoch: int, samples_done: int) -> None:
        """On its next pass through ``epoch``, start after the first ``samples_done`` samples of this rank."""
        self.resume_epoch, self.samples_done = epoch, samples_done

    def resume_when_iterated(self, progress: Callable[[], tuple[int, int]]) -> None:
        """Call ``progress() -> (epoch, samples_done)`` when the first pass starts and :meth:`resume` from there."""
        self.progress = progress

    def __iter__(self) -> Iterator[int]:
        if self.progress is not None:
            epoch, samples_done = self.progress()
            self.progress = None
            if samples_done:
                self.resume(epoch, samples_done)
                log.info("Resuming epoch %d after its first %d samples.", epoch, samples_done)
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.samples_done :]
            self.resume_epoch = -1  # later passes over the same epoch number start from the beginning
        return iter(indices)


def batches_done_this_epoch(trainer: Any) -> int:
    """Training batches of the current epoch that a restored run has already processed (0 when fresh).

    A checkpoint written in ``on_train_batch_end`` counts the batch in progress as processed but not
    yet completed; ``processed`` is the number whose optimizer step is in the checkpoint either way.
    """
    if trainer is None:
        return 0
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def rng_states_of_all_ranks() -> list[dict[str, Any]]:
    """This process's torch and Python random states, gathered from every rank (one entry per rank).

    Dropout draws from these, and each rank draws a different amount (its batches have their own
    padded lengths), so a resumed run needs every rank's own state back, not rank 0's.
    Called on all ranks at once, as Lightning saves checkpoints.
    """
    import random

    import torch
    import torch.distributed as dist

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def restore_rng_state(saved: list[dict[str, Any]] | dict[str, Any], rank: int) -> None:
    """Restore the random states :func:`rng_states_of_all_ranks` saved for ``rank`` (rank 0's if it has none)."""
    import random

    import torch

    states = [saved] if isinstance(saved, dict) else saved  # checkpoints before 0.1.1 hold rank 0's only
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
