"""Nothing we read runs code: a payload planted in every kind of checkpoint we load is refused and never runs.

Each case plants a pickle whose unpickling would create a marker file, hands the checkpoint to one
load path (the library call, the ``memopt`` command, the strategy presets' resume), and asserts a
clear error and no marker. The folders are real ``torch.distributed.checkpoint`` and DeepSpeed layouts.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CONLL_LABELS

from lightning_memopt import UnsafeCheckpointError, load_task_checkpoint, read_checkpoint, verify_checkpoint
from lightning_memopt.cli import main
from lightning_memopt.core.checkpoints import DCP_METADATA_FILE, read_dcp_metadata


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def task_checkpoint_state() -> dict[str, Any]:
    """What meta.pt of a sharded checkpoint of our token classification module holds."""
    return {
        "memopt_task": "TokenClassificationModule",
        "global_step": 3,
        "hyper_parameters": {"model_name_or_path": "unused", "labels": CONLL_LABELS},
    }


def write_dcp_folder(folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """A sharded checkpoint folder as FSDP2 writes it: DCP shards plus meta.pt (single process)."""
    from torch.distributed.checkpoint import save

    state = {"state_dict": {"model.classifier.weight": torch.ones(9, 4)}, "optimizer_0": {"lr": 0.1}, **(extra or {})}
    save(state, checkpoint_id=folder, no_dist=True)
    torch.save(task_checkpoint_state(), folder / "meta.pt")
    return folder


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture(params=["metadata", "bytes-entry", "meta.pt"])
def crafted_folder(request: pytest.FixtureRequest, tmp_path: Path, marker: Path) -> Path:
    """A DCP folder whose .metadata, one non-tensor entry, or meta.pt carries the payload."""
    folder = tmp_path / "last.ckpt"
    if request.param == "bytes-entry":
        return write_dcp_folder(folder, {"extra": Payload(marker)})
    write_dcp_folder(folder)
    if request.param == "metadata":
        (folder / DCP_METADATA_FILE).write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({**task_checkpoint_state(), "evil": Payload(marker)}, folder / "meta.pt")
    assert not marker.exists()
    return folder


@pytest.fixture
def crafted_deepspeed_folder(tmp_path: Path, marker: Path) -> Path:
    """A DeepSpeed checkpoint folder (``latest`` naming a tag folder) whose model-state file carries the payload."""
    folder = tmp_path / "zero.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save({"module": {}, "evil": Payload(marker)}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    return folder


def test_a_plain_sharded_folder_still_reads(tmp_path: Path) -> None:
    folder = write_dcp_folder(tmp_path / "last.ckpt")
    verify_checkpoint(folder)
    checkpoint = read_checkpoint(folder)
    assert checkpoint["global_step"] == 3
    assert torch.equal(checkpoint["state_dict"]["model.classifier.weight"], torch.ones(9, 4))


def test_read_checkpoint_and_verify_refuse_a_crafted_sharded_folder(crafted_folder: Path, marker: Path) -> None:
    for read in (verify_checkpoint, read_checkpoint, load_task_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match="Nothing from it was run"):
            read(crafted_folder)
    assert not marker.exists()


def test_a_crafted_checkpoint_file_is_refused(tmp_path: Path, marker: Path) -> None:
    torch.save({"state_dict": {}, "evil": Payload(marker)}, tmp_path / "evil.ckpt")
    for read in (verify_checkpoint, read_checkpoint, load_task_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt"):
            read(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_a_crafted_deepspeed_folder_is_refused(crafted_deepspeed_folder: Path, marker: Path) -> None:
    for read in (verify_checkpoint, read_checkpoint):
        with pytest.raises(UnsafeCheckpointError):
            read(crafted_deepspeed_folder)
    assert not marker.exists()


def test_shard_paths_and_deepspeed_tags_cannot_leave_the_folder(tmp_path: Path) -> None:
    folder = write_dcp_folder(tmp_path / "last.ckpt")
    metadata = read_dcp_metadata(folder)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (folder / DCP_METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="points outside the folder"):
        read_checkpoint(folder)
    deepspeed = tmp_path / "zero.ckpt"
    deepspeed.mkdir()
    (deepspeed / "latest").write_text("../../etc")
    with pytest.raises(UnsafeCheckpointError, match="not a tag folder inside it"):
        verify_checkpoint(deepspeed)


@pytest.mark.parametrize("command", ["export", "student"])
def test_memopt_export_and_student_refuse_a_crafted_folder(
    command: str, crafted_folder: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = {
        "export": ["export", f"--ckpt_path={crafted_folder}", f"--output_dir={tmp_path / 'out'}"],
        "student": ["student", f"--teacher={crafted_folder}", "--layers=[0]", f"--output_dir={tmp_path / 'out'}"],
    }[command]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("memopt: error: Refused to load") and "\n" not in error
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_the_distillation_teacher_option_refuses_a_crafted_folder(crafted_folder: Path, marker: Path) -> None:
    from lightning_memopt.distillation.teacher import load_teacher

    with pytest.raises(UnsafeCheckpointError):
        load_teacher(str(crafted_folder))
    assert not marker.exists()


def test_the_strategy_presets_verify_before_resuming(
    crafted_folder: Path, crafted_deepspeed_folder: Path, marker: Path
) -> None:
    from lightning_memopt import FSDP1Strategy, FSDP2Strategy, ZeROStrategy

    for strategy, folder in (
        (FSDP2Strategy(), crafted_folder),
        (FSDP1Strategy(), crafted_folder),
        (ZeROStrategy(), crafted_deepspeed_folder),
    ):
        with pytest.raises(UnsafeCheckpointError):
            strategy.load_checkpoint(folder)  # Lightning / DeepSpeed would unpickle it plainly after this
    assert not marker.exists()


def test_memopt_fit_refuses_a_crafted_ckpt_path_whatever_the_strategy(
    tiny_bert_dir: Path, conll_small: dict[str, Path], crafted_folder: Path, marker: Path, tmp_path: Path
) -> None:
    from helpers import small_ner_args

    from lightning_memopt.cli import run_cli

    args = ["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=2), f"--ckpt_path={crafted_folder}"]
    args += [f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false"]
    with pytest.raises(UnsafeCheckpointError):
        run_cli(args)
    assert not marker.exists()
