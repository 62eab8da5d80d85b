"""Causal LMs in a plain module that calls ``self.model(...)`` train and resume exactly under the sharding presets
(FSDP1, FSDP2, ZeRO-3) on 2 CPU processes: tiny Llama (GQA, SwiGLU) and GPT-2 (Conv1D, tied head)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, fast_python, run_together

SCRIPT = PROJECT_ROOT / "tests" / "causal_sharded_fit.py"
BLOCKS = {"llama": ["model.model.layers.0", "model.model.layers.1"], "gpt2": ["model.transformer.h.0", "model.transformer.h.1"]}  # fmt: skip


def command(out_dir: Path, strategy: str, model: str, *extra: str) -> tuple[list[str], None]:
    out_dir.mkdir(exist_ok=True)
    return [fast_python(), str(SCRIPT), str(out_dir), strategy, model, *extra], None


def records(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize(("strategy", "model"), [("fsdp2", "llama"), ("fsdp2", "gpt2"), ("fsdp1", "gpt2"), ("zero3", "llama")])  # fmt: skip
def test_a_causal_lm_called_as_self_model_trains_and_resumes_exactly(strategy: str, model: str, tmp_path: Path) -> None:
    straight_run, killed = run_together(  # independent runs, side by side
        [command(tmp_path / "straight", strategy, model), command(tmp_path / "resumed", strategy, model, "--interrupt", "3")]
    )  # fmt: skip
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    assert killed.returncode != 0 and "killed" in killed.stderr, killed.stderr[-3000:]
    (resumed_run,) = run_together(
        [command(tmp_path / "resumed", strategy, model, "--ckpt_path", str(tmp_path / "resumed" / "last.ckpt"))]
    )
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "resumed")
    for record in straight + resumed:
        assert record["step"] == 4
    if strategy == "fsdp2":  # the root shard sits where the forward runs: blocks of the model, not the module
        assert straight[0]["sharded_blocks"] == BLOCKS[model]
    for rank in (0, 1):  # steps 3 and 4 ran again from the step-2 checkpoint: the same losses, bit for bit
        assert resumed[rank]["losses"] == {step: straight[rank]["losses"][step] for step in ("3", "4")}
