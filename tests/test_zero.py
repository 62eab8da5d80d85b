"""``ZeROStrategy``: DeepSpeed ZeRO stages 1-3 train the NER recipe on two CPU processes, resume and export."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import MEMOPT, subprocess_env
from test_cli import RECIPES, memopt, small_ner_args
from transformers import AutoModelForTokenClassification

from lightning_memopt import ZeROStrategy
from lightning_memopt.checkpoint_reading import read_checkpoint

pytestmark = pytest.mark.slow


def zero_args(stage: int) -> list[str]:
    return [
        "--config",
        str(RECIPES / f"strategies/zero{stage}.yaml"),
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.strategy.init_args.bucket_size=1000000",
    ]


def last_checkpoint(root: Path) -> Path:
    return root / "runs/ner-conll2003/checkpoints/last.ckpt"


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_run_killed_mid_training_resumes_to_the_uninterrupted_weights(
    stage: int, tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    args = ["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=6), *zero_args(stage)]
    for run in ("straight", "resumed"):
        (tmp_path / run).mkdir()
    memopt(args, cwd=tmp_path / "straight")
    killed = subprocess.run(
        [*MEMOPT, *args, "--trainer.callbacks+=param_digest.KillAfterStep", "--trainer.callbacks.step=4"],
        cwd=tmp_path / "resumed",
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode != 0
    assert read_checkpoint(last_checkpoint(tmp_path / "resumed"), tensors=False)["global_step"] == 3
    resumed = memopt([*args, "--ckpt_path=last"], cwd=tmp_path / "resumed")
    assert "Restored all states" in resumed.stdout + resumed.stderr

    straight = read_checkpoint(last_checkpoint(tmp_path / "straight"))
    again = read_checkpoint(last_checkpoint(tmp_path / "resumed"))
    assert straight["global_step"] == again["global_step"] == 6
    assert straight["state_dict"].keys() == again["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, again["state_dict"][name]), name


def test_zero2_with_activation_checkpointing_trains_and_exports(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    args = [*small_ner_args(tiny_bert_dir, conll_small, steps=3), *zero_args(2)]
    memopt(["fit", *args, "--trainer.strategy.init_args.activation_checkpointing=true"], cwd=tmp_path)
    last = last_checkpoint(tmp_path)
    assert (last / "latest").read_text().strip() == "checkpoint"
    memopt(["export", f"--ckpt_path={last}", "--output_dir=exported"], cwd=tmp_path)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "exported")
    weight = read_checkpoint(last)["state_dict"]["model.bert.encoder.layer.1.output.dense.weight"]
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, weight)


def test_zero_options_are_checked_early() -> None:
    with pytest.raises(ValueError, match="the stage is 1, 2 or 3"):
        ZeROStrategy(stage=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offload=True\\) needs stage 2 or 3"):
        ZeROStrategy(stage=1, offload=True)


def test_zero_offload_on_cpu_is_refused_before_training(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    args = [
        "fit",
        *small_ner_args(tiny_bert_dir, conll_small, steps=2),
        *zero_args(2),
        "--trainer.strategy.init_args.offload=true",
    ]
    result = subprocess.run(
        [*MEMOPT, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "ZeROStrategy(offload=True) needs CUDA devices" in result.stderr
