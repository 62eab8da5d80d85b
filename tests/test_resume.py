"""An interrupted run resumed from its checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import Interrupt, fit_tiny_ner
from lightning.pytorch import Callback

from lightning_memopt.tasks.resumable import ResumableShuffleSampler


class BatchRecorder(Callback):
    def __init__(self) -> None:
        self.first_ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.first_ids.append(int(batch["input_ids"][0, 1]))


def run(tiny_bert_dir: Path, conll_small: dict[str, Path], root: Path, callbacks: list, ckpt_path: str | None = None):
    """14 steps on 160 sentences (10 batches an epoch), ``root/last.ckpt`` every 6 steps."""
    return fit_tiny_ner(tiny_bert_dir, conll_small["train"], root, callbacks, 14, 6, ckpt_path)


def test_resume_mid_epoch_matches_uninterrupted_run(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    straight = BatchRecorder()
    reference, _ = run(tiny_bert_dir, conll_small, tmp_path / "straight", [straight])

    first = BatchRecorder()
    with pytest.raises(SystemExit):
        run(tiny_bert_dir, conll_small, tmp_path / "resumed", [Interrupt(step=7), first])
    last = tmp_path / "resumed" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # killed after step 7, last save at 6

    second = BatchRecorder()
    resumed, trainer = run(tiny_bert_dir, conll_small, tmp_path / "resumed", [second], ckpt_path=str(last))
    assert trainer.global_step == 14
    # The same batches in the same order: steps 1-6 before the kill, 7-14 after it (epoch 1 starts at step 11).
    assert first.first_ids[:6] + second.first_ids == straight.first_ids
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"


def test_sampler_shards_and_resumes() -> None:
    shards = [list(ResumableShuffleSampler(list(range(10)), num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    sampler = ResumableShuffleSampler(list(range(10)), seed=3)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    sampler.resume(epoch=2, samples_done=7)
    assert list(sampler) == epoch2[7:]
    assert list(sampler) == epoch2  # only the first pass is shortened
    sampler.set_epoch(3)
    assert list(sampler) != epoch2
