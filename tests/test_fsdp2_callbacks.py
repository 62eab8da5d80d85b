"""Our callbacks under FSDP2 (FSDP2Strategy, a ModelParallelStrategy preset) on 2 CPU processes with gloo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, fast_python, run_together

SCRIPT = PROJECT_ROOT / "tests" / "fsdp2_fit.py"


def fit_command(out_dir: Path, conll_small: dict[str, Path], model_dir: Path, structure: str, *extra: str) -> list[str]:
    return [fast_python(), str(SCRIPT), str(out_dir), str(conll_small["train"]), str(model_dir), structure, *extra]


def rank_records(result: subprocess.CompletedProcess, out_dir: Path) -> list[dict]:
    """What each rank of a finished run wrote; an interrupted run (``--interrupt``) must have been killed."""
    if "--interrupt" in result.args:
        assert result.returncode != 0 and "killed" in result.stderr
        return []
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def launch(out_dir: Path, conll_small: dict[str, Path], model_dir: Path, structure: str, *extra: str) -> list[dict]:
    (result,) = run_together([(fit_command(out_dir, conll_small, model_dir, structure, *extra), None)])
    return rank_records(result, out_dir)


def test_masks_on_sharded_weights_are_exact_identical_on_both_ranks_and_resume(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    folders = {run: tmp_path / run for run in ("unstructured", "straight", "resumed")}
    runs = [  # independent runs, side by side
        fit_command(folders["unstructured"], conll_small, tiny_bert_dir, "unstructured"),
        fit_command(folders["straight"], conll_small, tiny_bert_dir, "heads_and_neurons"),
        fit_command(folders["resumed"], conll_small, tiny_bert_dir, "heads_and_neurons", "--interrupt", "5"),
    ]
    unstructured, straight_run, killed = run_together([(run, None) for run in runs])
    ranks = rank_records(unstructured, folders["unstructured"])
    for record in ranks:
        assert record["sharded_blocks"] == ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"]
        assert record["sharded"]  # the callback masked DTensor shards, not full copies
        assert record["zeros"] and all(z == pytest.approx(0.5) for z in record["zeros"].values())
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["masks"] == ranks[1]["masks"]

    straight = rank_records(straight_run, folders["straight"])
    assert [sum(kept) for kept in straight[0]["kept_units"].values()] == [32, 1, 32, 1]
    rank_records(killed, folders["resumed"])
    checkpoint = tmp_path / "resumed" / "last.ckpt"  # a distributed (sharded) checkpoint folder, saved at step 4
    resumed = launch(
        tmp_path / "resumed", conll_small, tiny_bert_dir, "heads_and_neurons", "--ckpt_path", str(checkpoint)
    )
    for record in resumed:
        assert record["sparsity"] == 0.5
        assert record["masks"] == straight[0]["masks"] and record["kept_units"] == straight[0]["kept_units"]


def test_distillation_teacher_is_a_full_replica_outside_the_sharded_student(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    from test_distillation_callback import make_teacher

    teacher_dir = make_teacher(tiny_bert_dir, tmp_path / "teacher")
    ranks = launch(tmp_path / "kd", conll_small, tiny_bert_dir, "none", "--teacher", str(teacher_dir))
    for record in ranks:
        assert record["sharded"]  # the student is sharded by fully_shard ...
        assert not record["teacher"]["sharded"] and not record["teacher"]["inside_module"]  # ... the teacher is not
        assert record["teacher"]["train_kd"] > 0
    assert ranks[0]["teacher"]["digest"] == ranks[1]["teacher"]["digest"]
    assert ranks[0]["params"] == ranks[1]["params"]
