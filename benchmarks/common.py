"""Helpers shared by the benchmark scripts: machine description, peak memory, a step timer callback."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
PAGES = PROJECT_ROOT / "docs" / "results"
RESUME_MARKER = "resume-from-last"  # in a run folder: fit_recipe resumes from its checkpoints/last.ckpt


def budget_name(steps: int) -> str:
    """How results pages name a budget: the step count, or ``full`` for 0 (each recipe's own length)."""
    return str(steps) if steps else "full"


def results_file(name: str, steps: int, results: Path = RESULTS) -> Path:
    """Where a benchmark's figures are saved: ``benchmarks/results/<name>-<steps or full>.json``."""
    return results / f"{name}-{budget_name(steps)}.json"


def load_results(name: str, steps: int, results: Path = RESULTS) -> dict[str, Any]:
    """The saved figures of ``name`` at ``steps`` (for ``--render``); a clear error if none were saved."""
    saved = results_file(name, steps, results)
    if not saved.exists():
        raise SystemExit(f"--render: no saved results at {saved}; run the benchmark with --steps {steps} first")
    return json.loads(saved.read_text())


def machine() -> str:
    """One line naming CPU model, cores, memory and library versions."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import lightning
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; torch {torch.__version__}, "
        f"lightning {lightning.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of the instruction sets int8 and bf16 speed depend on this CPU has (from /proc/cpuinfo)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    present = set(text.split())
    return [flag for flag in CPU_FLAGS if flag in present]


def today() -> str:
    return dt.date.today().isoformat()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer(Callback):
    """Times training batches (forward, backward, optimizer) apart from validation, and counts samples."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.validation_seconds = 0.0
        self.samples = 0
        self.steps = 0
        self._started = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.train_seconds += time.perf_counter() - self._started
        first = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self.samples += int(first.shape[0])
        self.steps += 1

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validation_seconds += time.perf_counter() - self._validation_started

    def summary(self) -> dict[str, float]:
        return {
            "train_seconds": round(self.train_seconds, 1),
            "validation_seconds": round(self.validation_seconds, 1),
            "train_steps": self.steps,
            "train_samples_per_second": round(self.samples / max(self.train_seconds, 1e-9), 2),
        }


TASKS = {
    "ner": {
        "title": "CoNLL-2003 NER (validation, entity micro F1)",
        "configs": ["recipes/ner/conll2003.yaml", "recipes/ner/conll2003-offline.yaml"],
        "metric": "val_f1",
        "auto_class": "AutoModelForTokenClassification",
    },
    "sst2": {
        "title": "SST-2 (dev accuracy)",
        "configs": ["recipes/classification/sst2.yaml", "recipes/classification/sst2-offline.yaml"],
        "metric": "val_accuracy",
        "auto_class": "AutoModelForSequenceClassification",
    },
}


def recipe_epochs(task: str) -> int:
    """The ``trainer.max_epochs`` a task's recipe configs end up with (a later config overrides an earlier one).

    ``recipe_epochs("ner") == 3`` (CoNLL-2003), ``recipe_epochs("sst2") == 1`` (its offline overlay says 1).
    """
    epochs = None
    for config in TASKS[task]["configs"]:
        epochs = (yaml.safe_load((PROJECT_ROOT / config).read_text()).get("trainer") or {}).get("max_epochs", epochs)
    if epochs is None:
        raise ValueError(f"none of {TASKS[task]['configs']} sets trainer.max_epochs")
    return int(epochs)


def step_budget(steps: int, seed: int | None = None, *, task: str | None = None, times: int = 1) -> list[str]:
    """CLI flags for ``times`` x a budget of ``steps`` optimizer steps, one validation at the end (and ``seed``).

    ``steps=0`` keeps the recipe's own length (3 epochs CoNLL-2003, 1 epoch SST-2) and validation points;
    ``times`` then multiplies the recipe's epochs, which needs ``task``: ``step_budget(0, task="ner", times=3)``
    is ``["--trainer.max_epochs=9"]``.
    """
    budget = []
    if steps:
        budget += [f"--trainer.max_steps={steps * times}", f"--trainer.val_check_interval={steps * times}"]
        budget += ["--trainer.check_val_every_n_epoch=null"]
    elif times != 1:
        if task is None:
            raise ValueError("step_budget(0, times=...) scales the recipe's epochs: name the task")
        budget.append(f"--trainer.max_epochs={recipe_epochs(task) * times}")
    if seed is not None:
        budget.append(f"--seed_everything={seed}")
    return budget


def budget_words(steps: int) -> str:
    """How a results page names its budget: ``budget_words(600) == "600 optimizer steps"``; 0 is each recipe's own."""
    return f"{steps} optimizer steps" if steps else "full recipe length"


def validation_history(log_dir: Path, metric: str) -> list[dict]:
    """``[{"step": ..., metric: ...}]`` for every validation the CSV logger recorded in a run's log folder.

    A resumed run logs to a new ``version_N`` beside the interrupted one's; the versions are read in order, and
    a validation the resumed run repeats (it restarted from a checkpoint before that step) is counted once, with
    the later value.
    """
    versions = sorted(
        log_dir.parent.glob("version_*/metrics.csv"), key=lambda path: int(path.parent.name.removeprefix("version_"))
    )
    by_step: dict[int, float] = {}
    for metrics_csv in versions:
        with metrics_csv.open() as handle:
            by_step |= {int(row["step"]) + 1: float(row[metric]) for row in csv.DictReader(handle) if row.get(metric)}
    return [{"step": step, metric: value} for step, value in sorted(by_step.items())]


def exact_final(result: dict) -> float:
    """A run's final score at full precision: its last logged validation (``final`` is rounded to 4 digits).

    ``exact_final({"metric": "val_f1", "final": 0.897, "history": [{"step": 9, "val_f1": 0.897024}]}) == 0.897024``;
    a result without a history gives its ``final``.
    """
    return result["history"][-1][result["metric"]] if result.get("history") else result["final"]


def fit_recipe(
    task: str, root: Path, budget: list[str], callbacks: list[Callback] | None = None, configs: tuple[Path, ...] = ()
) -> tuple[Any, dict]:
    """Fit a task's offline recipe in this process through ``memopt fit``'s code path; return the CLI and figures.

    ``configs`` are overlays after the recipe's (e.g. a benchmark variant's); ``budget`` is extra CLI flags
    (e.g. :func:`step_budget`); ``callbacks`` are added to the recipe's own.
    The last checkpoint is ``root/checkpoints/last.ckpt``.
    """
    from lightning_memopt.cli import run_cli
    from lightning_memopt.core.checkpoints import read_checkpoint

    spec = TASKS[task]
    timer = StepTimer()
    args = ["fit"]
    for config in [*(PROJECT_ROOT / config for config in spec["configs"]), *configs]:
        args += ["--config", str(config)]
    args += [
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--checkpoint.dirpath={root / 'checkpoints'}",
        f"--last_checkpoint.dirpath={root / 'checkpoints'}",
        "--trainer.enable_progress_bar=false",
        *budget,
    ]
    last, marker = root / "checkpoints" / "last.ckpt", root / RESUME_MARKER
    resumed_from = read_checkpoint(last, tensors=False)["global_step"] if marker.exists() else None
    if resumed_from is not None:  # an interrupted run that run_child(skip_done=True) kept
        args.append(f"--ckpt_path={last}")
    started = time.perf_counter()
    cli = run_cli(args, trainer_defaults={"callbacks": [timer, *(callbacks or [])]})
    wall = time.perf_counter() - started
    cli.trainer.save_checkpoint(last, weights_only=False)  # the whole state, so that the run can go on
    marker.unlink(missing_ok=True)
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val_")}
    return cli, {
        "task": task,
        "metric": spec["metric"],
        "final": metrics.get(spec["metric"]),
        "best": round(float(cli.trainer.checkpoint_callback.best_model_score or 0), 4),
        "metrics": metrics,
        "history": validation_history(Path(cli.trainer.logger.log_dir), spec["metric"]),
        **({"resumed_from_step": resumed_from} if resumed_from is not None else {}),
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib(), 0),
        "epochs": cli.trainer.current_epoch,
        **timer.summary(),
    }


class LoopTimer(Callback):
    """Seconds between consecutive training-batch starts (the whole loop iteration), after ``warmup`` batches.

    With ``epoch`` set, only batches of that epoch count (e.g. 1, after a callback acted at the end of epoch 0).
    """

    def __init__(self, warmup: int = 5, epoch: int | None = None) -> None:
        self.warmup, self.epoch = warmup, epoch
        self.times: list[float] = []
        self.last: float | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        in_epoch = self.epoch is None or trainer.current_epoch == self.epoch
        if in_epoch and self.last is not None and batch_idx > self.warmup:
            self.times.append(now - self.last)
        self.last = now

    def median(self) -> float:
        return statistics.median(self.times)


def latency_ms(
    models: dict[str, torch.nn.Module], inputs: dict[str, Any], rounds: int = 5, runs: int = 6
) -> dict[str, float]:
    """Median forward time (ms) of each model on ``inputs``, the models interleaved in every round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(**inputs)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                started = time.perf_counter()
                for _ in range(runs):
                    model(**inputs)
                times[name].append((time.perf_counter() - started) / runs * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def latency_inputs(batch: int = 8, length: int = 128) -> dict[str, torch.Tensor]:
    """A fixed batch of token ids (BERT vocabulary range) for latency measurements."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def benchmark_parser(doc: str | None, extra_parts: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The options every benchmark script shares (``--_child`` is how a script runs one variant in a child).

    ``extra_parts`` are parts a script offers beyond ``accuracy`` and ``overhead``; they run only when named.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=40, help="optimizer steps per run (docs: 600; 0: each recipe's own length)"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parts = ["accuracy", "overhead"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=[*parts, *extra_parts])
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # a child's seed_everything
    parser.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    parser.add_argument(
        "--skip_done",
        action="store_true",
        help="reuse runs whose result.json is in --workdir, resume interrupted ones from their last.ckpt "
        "(others start afresh)",
    )
    parser.add_argument(
        "--render", action="store_true", help="rewrite the docs page from the saved results and notes; run nothing"
    )
    parser.add_argument("--_child", nargs="+", default=None, help=argparse.SUPPRESS)
    return parser


def payload_header(script: str) -> dict[str, Any]:
    """Command, machine and date of this benchmark run."""
    return {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]), "machine": machine(), "date": today()}


def prepare_run_folder(folder: Path, skip_done: bool) -> Path | None:
    """Empty a run's folder before it is trained again, or keep an interrupted run to resume.

    With ``skip_done``, a folder with ``checkpoints/last.ckpt`` and no ``result.json`` is an interrupted
    run: it is kept and marked, and the ``last.ckpt`` that :func:`fit_recipe` will resume from is
    returned. Otherwise the folder is removed.
    """
    last = folder / "checkpoints" / "last.ckpt"
    if skip_done and last.exists() and not (folder / "result.json").exists():
        (folder / RESUME_MARKER).touch()  # tells fit_recipe, in the child, to resume
        return last
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run's checkpoints and logs
    return None


def run_child(
    script: str,
    workdir: Path,
    steps: int,
    task: str,
    variant: str,
    *extra: str,
    skip_done: bool = False,
    seed: int | None = None,
) -> dict:
    """Run one variant of ``script`` in a child process (or reuse its result) and return its ``result.json``.

    With ``seed``, the child trains with that ``seed_everything`` and works in ``workdir/seed-<seed>``.
    """
    if seed is not None:
        workdir = workdir / f"seed-{seed}"
    done = workdir / task / variant / "result.json"
    if not (skip_done and done.exists()):
        resume = prepare_run_folder(done.parent, skip_done)
        print(f"== {task} / {variant}" + (f" / seed {seed}" if seed is not None else ""), flush=True)
        if resume:
            print(f"   resuming the interrupted run from {resume}", flush=True)
        command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / script), "--_child", task, variant, *extra]
        command += [
            "--workdir",
            str(workdir),
            "--steps",
            str(steps),
            *(["--seed", str(seed)] if seed is not None else []),
        ]
        subprocess.run(command, check=True, cwd=PROJECT_ROOT)
    result = json.loads(done.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return result


def write_child_result(workdir: Path, task: str, variant: str, result: dict) -> None:
    folder = workdir / task / variant
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result))


def carry_over(name: str, steps: int, payload: dict[str, Any], keys: list[str], results: Path = RESULTS) -> None:
    """Keep the parts of the last saved ``<name>-<steps>.json`` that this run did not measure, noting their origin.

    ``keys`` name the payload's parts (e.g. ``["accuracy", "overhead"]``); a part that is a dict keyed by task
    is merged task by task, and a task's list of ``{"variant": ...}`` rows variant by variant, so rerunning one
    task, one variant or one part leaves the others' recorded figures in place.
    """
    saved = results_file(name, steps, results)
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    origins = payload.setdefault("carried_over", {})

    def origin(key: str) -> dict[str, str]:
        where = {field: previous[field] for field in ("command", "date", "machine") if field in previous}
        return previous.get("carried_over", {}).get(key, where)

    for key in keys:
        if key not in previous:
            continue
        if key not in payload:
            payload[key], origins[key] = previous[key], origin(key)
        elif isinstance(payload[key], dict) and isinstance(previous[key], dict):
            for sub, saved_rows in previous[key].items():
                if sub not in payload[key]:
                    origins[f"{key}.{sub}"] = origin(f"{key}.{sub}")
                elif is_variant_rows(saved_rows) and is_variant_rows(payload[key][sub]):
                    payload[key][sub], kept = merge_variant_rows(saved_rows, payload[key][sub])
                    origins |= {f"{key}.{sub}.{name}": origin(f"{key}.{sub}.{name}") for name in kept}
            # saved order with this run's figures: a rerun task keeps its place on the page, a new one goes last
            payload[key] = {**previous[key], **payload[key]}
    if not origins:
        del payload["carried_over"]


def is_variant_rows(value: Any) -> bool:
    """True for a list of result rows that each name their ``variant`` (the pruning benchmark's tasks)."""
    return isinstance(value, list) and all(isinstance(row, dict) and "variant" in row for row in value)


def merge_variant_rows(saved: list[dict], rerun: list[dict]) -> tuple[list[dict], list[str]]:
    """The saved rows with the rerun ones in their place and new ones last, and the names of the rows kept as saved.

    Example:
        >>> merge_variant_rows([{"variant": "a", "f1": 1}, {"variant": "b", "f1": 2}], [{"variant": "b", "f1": 3}])
        ([{'variant': 'a', 'f1': 1}, {'variant': 'b', 'f1': 3}], ['a'])
    """
    fresh = {row["variant"]: row for row in rerun}
    saved_names = [row["variant"] for row in saved]
    merged = [fresh.get(row["variant"], row) for row in saved] + [
        row for row in rerun if row["variant"] not in saved_names
    ]
    return merged, [name for name in saved_names if name not in fresh]


def report_header(title: str, payload: dict[str, Any], *notes: str) -> list[str]:
    """The first lines of a results page: title, command, machine, date, parts kept from earlier runs, notes."""
    lines = [f"# {title}", "", f"- Command: `{payload['command']}`", f"- Machine: {payload['machine']}"]
    lines.append(f"- Date: {payload['date']}")
    by_origin: dict[str, list[str]] = {}  # one line per earlier run, naming every part kept from it
    for key, where in payload.get("carried_over", {}).items():
        when = ", ".join(where[field] for field in ("date", "machine") if field in where)
        by_origin.setdefault(f"`{where['command']}` ({when})", []).append(f"`{key}`")
    lines += [f"- {', '.join(keys)} kept from an earlier run: {origin}" for origin, keys in by_origin.items()]
    return [*lines, *(f"- {note}" for note in notes), ""]


def save_results(
    name: str, steps: int, payload: dict[str, Any], lines: list[str], results: Path = RESULTS, pages: Path = PAGES
) -> Path:
    """Write ``benchmarks/results/<name>-<steps>.json`` and ``docs/results/<name>-<steps>.md``; return the page.

    Hand-written notes on the figures live in ``docs/results/notes/<name>-<steps>.md`` and are appended to
    the page each time it is regenerated, so a rerun never drops them.
    """
    data = results_file(name, steps, results)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(payload, indent=2) + "\n")
    page = pages / f"{name}-{budget_name(steps)}.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    notes = pages / "notes" / page.name
    page.write_text("\n".join([*lines, *([notes.read_text().rstrip("\n"), ""] if notes.exists() else [])]))
    return page


CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def timed_ner_steps(
    model: str,
    make_callbacks: Callable[[LightningModule], list[Callback]],
    steps: int = 30,
    warmup: int = 5,
    second_epoch: bool = False,
) -> float:
    """Median seconds per CoNLL-2003 training step (batch 32) of ``model`` with the callbacks made for its module.

    ``second_epoch`` times the second of two short epochs (for callbacks that act at the end of the first).
    """
    from lightning_memopt import TokenClassificationDataModule, TokenClassificationModule

    torch.manual_seed(0)
    module = TokenClassificationModule(model, labels=CONLL_LABELS, learning_rate=1e-4)
    train_file = PROJECT_ROOT.parent / "shared" / "data" / "conll2003" / "train.txt.gz"
    data = TokenClassificationDataModule(train_file=str(train_file), batch_size=32)
    timer = LoopTimer(warmup, epoch=1 if second_epoch else None)
    length = (
        {"max_epochs": 2, "limit_train_batches": steps + warmup + 1}
        if second_epoch
        else {"max_steps": steps + warmup + 1}
    )
    trainer = Trainer(
        accelerator="cpu",
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *make_callbacks(module)],
        **length,
    )
    trainer.fit(module, datamodule=data)
    return timer.median()
