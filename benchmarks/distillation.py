"""KnowledgeDistillation benchmark: a 3-layer student with and without distillation, and the hook's overhead.

Teacher: the offline MiniLM-L6 fine-tuned by the task's recipe (``--teacher CKPT``, or trained here with
the same step budget). Student: the teacher's embeddings, head and layers 0, 2, 4
(``student_from_teacher``), trained with the task's recipe and the same budget, once with cross entropy
alone and once with ``KnowledgeDistillation`` (alpha 0.5, T 2). Retention = student score / teacher score.

Overhead: seconds per training step (whole loop iteration) of the student alone, of the student with
the callback, and of the teacher's forward pass alone on the same batches, in one process;
the hook's overhead beyond the teacher's forward is ``(with callback - teacher forward) / alone``.

    python benchmarks/distillation.py                                   # quick: 40 steps, both tasks
    python benchmarks/distillation.py --steps 600 --tasks ner --teacher /path/to/ner/last.ckpt

Results: ``benchmarks/results/distillation-<steps>.json`` and ``docs/results/distillation-<steps>.md``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PROJECT_ROOT,
    TASKS,
    benchmark_parser,
    budget_words,
    carry_over,
    fit_recipe,
    load_results,
    payload_header,
    report_header,
    run_child,
    save_results,
    step_budget,
    timed_ner_steps,
    write_child_result,
)
from variants import load_variants

LAYERS = [0, 2, 4]
STUDENTS = load_variants("distillation")  # recipes/benchmarks/distillation/*.yaml
KD_OPTIONS = STUDENTS["student+kd"].options("KnowledgeDistillation") or {}


def run_variant(task: str, variant: str, workdir: Path, steps: int, teacher: str | None) -> dict:
    """Train the teacher, or the student with or without distillation (runs in a child process)."""
    budget = step_budget(steps)
    if variant == "teacher":
        return fit_recipe(task, workdir / task / "teacher", budget)[1]
    assert teacher is not None
    root = workdir / task / variant
    overlay = STUDENTS[variant].config_file(root, runs=str(workdir / task), teacher=teacher)
    return fit_recipe(task, root, budget, configs=(overlay,))[1]


def make_student(teacher_ckpt: str, folder: Path) -> dict[str, int]:
    """Write the 3-layer student made from the teacher's layers; return both parameter counts."""
    from transformers import AutoTokenizer

    from lightning_memopt.distillation import load_teacher, student_from_teacher

    teacher = load_teacher(teacher_ckpt)
    student = student_from_teacher(teacher.model, LAYERS)
    student.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher.tokenizer_source).save_pretrained(folder)
    return {
        "teacher_params": sum(p.numel() for p in teacher.model.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
    }


def teacher_score(task: str, teacher_ckpt: str) -> float:
    """The teacher's validation score, measured here with the task's recipe."""
    from lightning_memopt.cli import run_cli

    args = ["validate"]
    for config in TASKS[task]["configs"]:
        args += ["--config", str(PROJECT_ROOT / config)]
    args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--ckpt_path={teacher_ckpt}"]
    cli = run_cli(args)
    return round(float(cli.trainer.callback_metrics[TASKS[task]["metric"]]), 4)


def overhead(workdir: Path, teacher_ckpt: str, repeats: int = 2, batches: int = 30) -> dict[str, Any]:
    """Per-step seconds of the NER student alone, with the callback, and of the teacher's forward alone."""
    from lightning_memopt import KnowledgeDistillation, TokenClassificationDataModule
    from lightning_memopt.distillation import load_teacher

    student_dir = str(workdir / "ner" / "student-init")
    data = TokenClassificationDataModule(
        train_file=str(PROJECT_ROOT.parent / "shared/data/conll2003/train.txt.gz"), tokenizer=student_dir, batch_size=32
    )
    data.setup("fit")
    loader = iter(data.train_dataloader())
    inputs = [{k: v for k, v in next(loader).items() if k in ("input_ids", "attention_mask")} for _ in range(batches)]
    teacher = load_teacher(teacher_ckpt).model.eval()

    def teacher_forward() -> float:
        times = []
        with torch.no_grad():
            for batch in inputs:
                started = time.perf_counter()
                teacher(**batch)
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    seconds: dict[str, list[float]] = {"student": [], "student+kd": [], "teacher forward": []}
    for _ in range(repeats):
        seconds["student"].append(timed_ner_steps(student_dir, lambda module: []))
        seconds["student+kd"].append(timed_ner_steps(student_dir, lambda module: [KnowledgeDistillation(teacher_ckpt)]))
        seconds["teacher forward"].append(teacher_forward())
        print("overhead:", {k: round(v[-1], 4) for k, v in seconds.items()}, flush=True)
    best = {kind: min(values) for kind, values in seconds.items()}
    hook = best["student+kd"] - best["teacher forward"] - best["student"]
    return {
        "seconds_per_step": {k: round(v, 4) for k, v in best.items()},
        "hook_overhead_ratio": round(hook / best["student"], 3),
        "with_callback_ratio": round(best["student+kd"] / best["student"], 3),
        "steps_timed": 30,
        "repeats": repeats,
    }


def write_report(payload: dict, steps: int) -> Path:
    lines = report_header(
        f"KnowledgeDistillation benchmark ({budget_words(steps)} per run)",
        payload,
        f"Teacher: all-MiniLM-L6-v2 fine-tuned by the task recipe; student: its embeddings, head and layers "
        f"{LAYERS}; distillation alpha {KD_OPTIONS['alpha']}, temperature {KD_OPTIONS['temperature']}; every run has the same budget and recipe.",
    )
    for task, result in payload.get("tasks", {}).items():
        metric = TASKS[task]["metric"]
        teacher = result["teacher_score"]
        lines += [
            f"## {TASKS[task]['title']}",
            "",
            f"| model | parameters | {metric} | retention of teacher |",
            "|---|---|---|---|",
            f"| teacher (6 layers) | {result['teacher_params']:,} | {teacher:.4f} | 100 % |",
        ]
        for variant in STUDENTS:
            score = result[variant]["final"]
            lines.append(
                f"| {variant} (3 layers) | {result['student_params']:,} | {score:.4f} | {100 * score / teacher:.1f} % |"
            )
        lines.append("")
    if "overhead" in payload:
        o = payload["overhead"]
        lines += [
            "## Step time (CoNLL-2003, batch 32, one process)",
            "",
            "| what | s/step |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in o["seconds_per_step"].items()),
            "",
            f"With the callback a step takes {o['with_callback_ratio']:.3f}x the student's; the hook's overhead beyond "
            f"the teacher's forward pass is {o['hook_overhead_ratio']:+.3f}x of a student step (best of "
            f"{o['repeats']} runs each, median over {o['steps_timed']} steps).",
            "",
        ]
    return save_results("distillation", steps, payload, lines)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--teacher", nargs="*", default=[], help="TASK=CKPT: reuse a fine-tuned teacher")
    args = parser.parse_args()
    if args.render:
        print(f"Report: {write_report(load_results('distillation', args.steps), args.steps)}")
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="memopt-distillation-"))
    if args._child:
        task, variant, teacher = args._child
        result = run_variant(task, variant, workdir, args.steps, None if teacher == "-" else teacher)
        write_child_result(workdir, task, variant, result)
        return
    teachers = dict(item.split("=", 1) for item in args.teacher)
    payload: dict[str, Any] = {**payload_header("distillation.py"), "tasks": {}}

    def child(task: str, variant: str, teacher: str) -> dict:
        return run_child("distillation.py", workdir, args.steps, task, variant, teacher, skip_done=args.skip_done)

    for task in args.tasks:
        if task not in teachers:
            child(task, "teacher", "-")
            teachers[task] = str(workdir / task / "teacher" / "checkpoints" / "last.ckpt")
        sizes = make_student(teachers[task], workdir / task / "student-init")
        if "accuracy" not in args.parts:
            continue
        result = {**sizes, "teacher_score": teacher_score(task, teachers[task])}
        for variant in STUDENTS:
            result[variant] = child(task, variant, teachers[task])
        payload["tasks"][task] = result
    if "overhead" in args.parts and "ner" in teachers:
        payload["overhead"] = overhead(workdir, teachers["ner"])
    carry_over("distillation", args.steps, payload, ["tasks", "overhead"])
    print(f"Report: {write_report(payload, args.steps)}")


if __name__ == "__main__":
    main()
