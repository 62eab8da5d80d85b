"""Running ``memopt``: recipe arguments, a small NER run, child processes, and the digests they write."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from helpers.paths import PROJECT_ROOT, RECIPES
from helpers.zygote import zygote_python

NER = ["--config", str(RECIPES / "ner/conll2003.yaml"), "--config", str(RECIPES / "ner/conll2003-offline.yaml")]
SST2 = [
    "--config",
    str(RECIPES / "classification/sst2.yaml"),
    "--config",
    str(RECIPES / "classification/sst2-offline.yaml"),
]
DDP_TWO_CPUS = ["--config", str(RECIPES / "strategies/ddp.yaml"), "--trainer.devices=2", "--trainer.accelerator=cpu"]


def fast_python() -> str:
    """The interpreter for ``-m lightning_memopt...`` runs and the tests' scripts: the test zygote's client
    (``helpers/zygote.py``), which starts the same run without importing torch, transformers and Lightning again."""
    return zygote_python(subprocess_env())


def memopt_command() -> list[str]:
    """``python -m lightning_memopt.cli``, through :func:`fast_python`."""
    return [fast_python(), "-m", "lightning_memopt.cli"]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """Environment for child processes: one BLAS thread each (the machine has two cores) and offline hubs."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "tests")]),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def digest_args(out_dir: Path) -> list[str]:
    """Flags adding the test-only ParameterDigest callback; put them last, after other callback flags."""
    return ["--trainer.callbacks+=param_digest.ParameterDigest", f"--trainer.callbacks.out_dir={out_dir}"]


def read_digests(out_dir: Path) -> list[dict]:
    """The records ParameterDigest wrote, one per rank, in rank order."""
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def small_ner_args(tiny_bert_dir: Path, conll_small: dict[str, Path], steps: int) -> list[str]:
    return [
        *NER,
        f"--model.model_name_or_path={tiny_bert_dir}",
        "--model.learning_rate=0.001",
        f"--data.train_file={conll_small['train']}",
        f"--data.val_file={conll_small['val']}",
        "--data.batch_size=8",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--last_checkpoint.every_n_train_steps=3",
    ]


def run_together(
    commands: Sequence[tuple[Sequence[str], Path | None]], timeout: int = 300
) -> list[subprocess.CompletedProcess]:
    """Run independent commands (each with its working folder) at the same time, in ``subprocess_env``; their
    results in order, whatever their exit status.

    A run on two CPU processes leaves a core idle while each rank imports torch and Lightning (most of a short
    run), so two runs side by side take little longer than one.
    """
    processes = [
        subprocess.Popen(
            list(command), cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command, cwd in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def memopt(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*memopt_command(), *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    return succeeded(result)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` after checking it exited with 0 (else its output's tails in the failure)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def fit_overlay_on_ddp(
    overlay: str, tiny_bert_dir: Path, conll_small: dict[str, Path], steps: int, cwd: Path, *extra: str
) -> tuple[str, list[dict]]:
    """``memopt fit`` of the small NER run with a recipe overlay (``recipes/``-relative) and ``extra`` flags on two
    DDP CPU processes, each rank writing its parameters' digest: the run's log and the ranks' records."""
    args = ["fit", *small_ner_args(tiny_bert_dir, conll_small, steps), "--config", str(RECIPES / overlay), *extra]
    result = memopt([*args, *DDP_TWO_CPUS, *digest_args(cwd / "digests")], cwd=cwd)
    return result.stdout + result.stderr, read_digests(cwd / "digests")
