"""An interrupted run resumed from its checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONLL_LABELS
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_memopt import AtomicCheckpointIO, TokenClassificationDataModule, TokenClassificationModule
from lightning_memopt.tasks.resumable import ResumableShuffleSampler


class Interrupt(Callback):
    """Kill the run (as a pre-empted job would be killed) after a given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SystemExit("killed")


class BatchRecorder(Callback):
    def __init__(self) -> None:
        self.first_ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.first_ids.append(int(batch["input_ids"][0, 1]))


def run(tiny_bert_dir: Path, conll_small: dict[str, Path], root: Path, callbacks: list, ckpt_path: str | None = None):
    torch.manual_seed(0)
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS, learning_rate=1e-3)
    data = TokenClassificationDataModule(train_file=str(conll_small["train"]), batch_size=16)  # 10 batches an epoch
    trainer = Trainer(
        max_steps=14,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(dirpath=root / "ckpt", save_top_k=0, save_last=True, every_n_train_steps=6),
            *callbacks,
        ],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def test_resume_mid_epoch_matches_uninterrupted_run(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    straight = BatchRecorder()
    reference, _ = run(tiny_bert_dir, conll_small, tmp_path / "straight", [straight])

    first = BatchRecorder()
    with pytest.raises(SystemExit):
        run(tiny_bert_dir, conll_small, tmp_path / "resumed", [Interrupt(step=7), first])
    last = tmp_path / "resumed" / "ckpt" / "last.ckpt"
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
