"""``ZeROStrategy`` (DeepSpeed ZeRO 1-3) and ``FSDP1Strategy`` train the NER recipe on two CPU processes, resume
exactly after a kill, and export."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import RECIPES, fake_trainer, memopt, memopt_command, run_together, small_ner_args, subprocess_env
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from transformers import AutoModelForTokenClassification

from lightning_memopt import FSDP1Strategy, FSDP2Strategy, ZeROStrategy
from lightning_memopt.core.blocks import required_blocks
from lightning_memopt.core.checkpoints import read_checkpoint
from lightning_memopt.tasks.optim import check_optimizer_strategy, offloads_optimizer

pytestmark = pytest.mark.slow


TWO_CPUS = ["--trainer.devices=2", "--trainer.accelerator=cpu"]


def zero_args(stage: int) -> list[str]:
    overlay = ["--config", str(RECIPES / f"strategies/zero{stage}.yaml")]
    return [*overlay, *TWO_CPUS, "--trainer.strategy.init_args.bucket_size=1000000"]


def fsdp1_args(state_dict_type: str) -> list[str]:
    overlay = ["--config", str(RECIPES / "strategies/fsdp1.yaml")]
    return [*overlay, *TWO_CPUS, f"--trainer.strategy.init_args.state_dict_type={state_dict_type}"]


CHECKPOINTING = "--trainer.strategy.init_args.activation_checkpointing=true"
PRESETS = {
    "ddp": ["--config", str(RECIPES / "strategies/ddp.yaml"), *TWO_CPUS],
    "fsdp2": ["--config", str(RECIPES / "strategies/fsdp2.yaml"), *TWO_CPUS],
    "zero1": zero_args(1),
    "zero3": zero_args(3),
    "fsdp1-sharded-checkpointing": [*fsdp1_args("sharded"), CHECKPOINTING],
}


def last_checkpoint(root: Path) -> Path:
    return root / "runs/ner-conll2003/checkpoints/last.ckpt"


@pytest.mark.parametrize("preset", PRESETS)
def test_run_killed_mid_training_resumes_to_the_uninterrupted_weights(
    preset: str, tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    args = ["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=6), *PRESETS[preset]]
    for run in ("straight", "resumed"):
        (tmp_path / run).mkdir()
    kill = ["--trainer.callbacks+=param_digest.KillAfterStep", "--trainer.callbacks.step=4"]
    straight_run, killed = run_together(  # independent runs, side by side
        [([*memopt_command(), *args], tmp_path / "straight"), ([*memopt_command(), *args, *kill], tmp_path / "resumed")]
    )
    assert straight_run.returncode == 0, straight_run.stdout[-3000:] + straight_run.stderr[-5000:]
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


@pytest.mark.parametrize("preset", ["zero2-checkpointing", "fsdp1-full-checkpointing"])
def test_trains_and_exports(preset: str, tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    overlay = zero_args(2) if preset.startswith("zero2") else fsdp1_args("full")
    memopt(["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=3), *overlay, CHECKPOINTING], cwd=tmp_path)
    last = last_checkpoint(tmp_path)
    if preset.startswith("zero2"):
        assert (last / "latest").read_text().strip() == "checkpoint"
    else:
        assert last.is_file()  # one full checkpoint, gathered on rank 0
    memopt(["export", f"--ckpt_path={last}", "--output_dir=exported"], cwd=tmp_path)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "exported")
    weight = read_checkpoint(last)["state_dict"]["model.bert.encoder.layer.1.output.dense.weight"]
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, weight)


def test_zero_options_are_checked_early() -> None:
    with pytest.raises(ValueError, match="the stage is 1, 2 or 3"):
        ZeROStrategy(stage=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offload=True\\) needs stage 2 or 3"):
        ZeROStrategy(stage=1, offload=True)


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ([*zero_args(2), "--trainer.strategy.init_args.offload=true"], "ZeROStrategy(offload=True) needs CUDA devices"),
        ([*fsdp1_args("sharded"), "--trainer.strategy.init_args.cpu_offload=true"], "cpu_offload=True) needs CUDA"),
    ],
)
def test_offload_on_cpu_is_refused_before_training(
    overlay: list[str], message: str, tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    args = ["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=2), *overlay]
    result = subprocess.run(
        [*memopt_command(), *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("strategy", [FSDP1Strategy, FSDP2Strategy])
def test_eight_bit_optimizers_are_refused_under_fsdp(strategy: type) -> None:
    trainer = fake_trainer(strategy())
    with pytest.raises(ValueError, match=f"adamw8bit cannot run under {strategy.__name__}.*ZeROStrategy"):
        check_optimizer_strategy("adamw8bit", trainer)
    check_optimizer_strategy("adamw", trainer)
    check_optimizer_strategy("paged_adamw8bit", fake_trainer(ZeROStrategy(stage=3)))


def test_zero_offload_takes_any_optimizer_and_refuses_8bit_ones() -> None:
    offloaded = ZeROStrategy(stage=3, offload=True)
    assert offloaded.config["zero_force_ds_cpu_optimizer"] is False  # DeepSpeed refuses torch's AdamW otherwise
    assert offloaded.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "zero_force_ds_cpu_optimizer" not in ZeROStrategy(stage=3).config
    assert offloads_optimizer(fake_trainer(offloaded))
    assert not offloads_optimizer(fake_trainer(ZeROStrategy(stage=2)))
    assert offloads_optimizer(fake_trainer(DeepSpeedStrategy(stage=2, offload_optimizer=True)))
    assert not offloads_optimizer(fake_trainer(DDPStrategy()))
    with pytest.raises(ValueError, match=r"adamw8bit cannot run with ZeROStrategy\(offload=True\).*optimizer adamw"):
        check_optimizer_strategy("adamw8bit", fake_trainer(offloaded))
    check_optimizer_strategy("adamw", fake_trainer(offloaded))


def test_a_model_without_transformer_blocks_gets_a_clear_error() -> None:
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"FSDP1Strategy found no transformer blocks in Sequential.*block_classes"):
        required_blocks(flat, None, "FSDP1Strategy")
    with pytest.raises(ValueError, match=r"block_classes=\['Nope'\] match no module"):
        required_blocks(flat, ["Nope"], "FSDP1Strategy")
