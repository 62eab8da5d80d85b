"""Every CPU runtime for one fine-tuned model, and our QAT against the runtimes' own post-training int8, in one run.

From a fine-tuned dense model (an exported folder, `memopt export`) the script writes, for one task:

- torch fp32 (the folder itself), torch.compile of it, our torch int8 (`memopt export --int8`, dynamic);
- ONNX Runtime fp32, its dynamic int8 and its static int8 (QDQ, calibrated) post-training quantization;
- OpenVINO fp32, OpenVINO bf16 (only where the CPU has bf16), OpenVINO int8 through NNCF post-training
  quantization;
- NNCF's QAT as its documentation shows it (`nncf.quantize`, then the baseline's own fine-tuning loop at a small
  learning rate: the recipe overlay recipes/quantization/openvino-qat.yaml, 200 steps at 2e-5), on OpenVINO;
- our QAT: the same run with knowledge distillation from the float model (alpha 0.5, T 2), on OpenVINO and, as
  its QDQ ONNX graph, on ONNX Runtime.

Calibrated and trained rows are repeated for each --seeds value (calibration subset; QAT seed); the others are
deterministic. Each row gets its dev-set metric (entity F1 / accuracy through `memopt predict`'s code on its own
runtime; torch.compile runs the same weights and operations as torch fp32 and is timed only), its weights on disk and
its CPU latency (batch 8 x 128 and 1 x 128, 2 threads, all rows interleaved in every round, median, in a fresh process;
the first seed's folder). The JSON carries issue 27's aims: qat_speed_vs_best_ptq, qat_minus_best_ptq,
qat_minus_fp32, and qat_minus_nncf_qat.

    python benchmarks/deploy.py --task ner --dense runs/exported/ner-dense --seeds 0 1 2

A rerun skips finished trainings, exports and scores (kept under --out). Results:
benchmarks/results/deploy-<task>.json; docs/results/deploy.md shows every task measured.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_FLAGS, PAGES, PROJECT_ROOT, RESULTS, cpu_flags, payload_header
from compress import dev_set, score, training_texts

from lightning_memopt.compress.final import weights_bytes
from lightning_memopt.deploy.export import MANIFEST, export_checkpoint, export_folder
from lightning_memopt.deploy.onnx import CALIBRATION_SIZE

RECIPES = {
    "ner": ["recipes/ner/conll2003.yaml", "recipes/ner/conll2003-offline.yaml"],
    "sst2": ["recipes/classification/sst2.yaml", "recipes/classification/sst2-offline.yaml"],
}
QAT_OVERLAY = "recipes/quantization/openvino-qat.yaml"
KD = ["--trainer.callbacks+=lightning_memopt.KnowledgeDistillation", "--trainer.callbacks.alpha=0.5",
      "--trainer.callbacks.temperature=2.0"]  # fmt: skip
SHAPES = ((8, 128), (1, 128))
FP32, COMPILE, TORCH_INT8 = "torch fp32", "torch.compile", "torch int8 (ours, dynamic, torch.ao kernel)"
ORT_FP32, ORT_DYNAMIC, ORT_STATIC = "ORT fp32", "ORT dynamic int8 PTQ", "ORT static int8 PTQ (QDQ)"
OV_FP32, OV_BF16, OV_PTQ = "OpenVINO fp32", "OpenVINO bf16", "OpenVINO int8 PTQ (NNCF)"
NNCF_QAT, OURS_OV, OURS_ORT = "NNCF QAT as documented (OpenVINO)", "our QAT + KD (OpenVINO)", "our QAT + KD (ORT)"
STRUCTURED_TORCH = "structured 50 %, shrunk folder (torch fp32)"
STRUCTURED_OV = "structured 50 %, shrunk folder (OpenVINO fp32)"
PTQ_ROWS = (ORT_DYNAMIC, ORT_STATIC, OV_PTQ)
OURS_ROWS = (OURS_OV, OURS_ORT)


@dataclass(frozen=True)
class Row:
    """One model on one runtime: a folder per seed (one for deterministic rows)."""

    name: str
    folders: tuple[str, ...]
    runtime: str  # torch, onnxruntime or openvino
    precision: str = "auto"  # OpenVINO: "f32" forces float32, "auto" is the plugin's choice (bf16 where it can)
    compiled: bool = False  # torch.compile (timed only)


def has_bf16() -> bool:
    return any(flag in cpu_flags() for flag in ("avx512_bf16", "amx_tile"))


def calibration_texts(task: str, seed: int) -> list[str]:
    texts = training_texts(task)
    return random.Random(seed).sample(texts, min(CALIBRATION_SIZE, len(texts)))


def from_folder(dense: Path, folder: Path, **options: Any) -> str:
    """``memopt export`` of the dense folder with ``options`` into ``folder``, unless an earlier run wrote it."""
    if not (folder / MANIFEST).exists():  # the manifest is written last
        # The dev metric judges each int8 row; the export's 99.5 % parity gate would drop a row rather than score it.
        export_folder(dense, folder, **({"min_agreement": 0.9} if options.get("int8") else {}), **options)
    return str(folder)


def from_checkpoint(checkpoint: Path, folder: Path, **options: Any) -> str:
    """``memopt export`` of a run's checkpoint with ``options`` into ``folder``, unless an earlier run wrote it."""
    if not (folder / MANIFEST).exists():
        export_checkpoint(checkpoint, folder, **options)
    return str(folder)


def qat_export(checkpoint: Path, folder: Path, format: str) -> str:
    """The int8 graph of a QAT run with its trained scales."""
    return from_checkpoint(checkpoint, folder, format=format, int8=True, min_agreement=0.9)


def train_qat(task: str, dense: Path, run: Path, seed: int, distil: bool) -> Path:
    """``memopt fit`` with the OpenVINO QAT overlay from ``dense`` (plus KD from it), resumed if interrupted."""
    last = run / "checkpoints" / "last.ckpt"
    if (run / "finished").exists():
        return last
    configs = [arg for path in [*RECIPES[task], QAT_OVERLAY] for arg in ("--config", path)]
    folders = [f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
               f"--checkpoint.dirpath={run / 'checkpoints'}", f"--last_checkpoint.dirpath={run / 'checkpoints'}"]  # fmt: skip
    kd = [*KD, f"--trainer.callbacks.teacher={dense}"] if distil else []
    command = [sys.executable, "-m", "lightning_memopt.cli", "fit", *configs, f"--model.model_name_or_path={dense}"]
    command += [f"--seed_everything={seed}", *kd, *folders, "--ckpt_path=auto"]
    subprocess.run(command, check=True, cwd=PROJECT_ROOT)
    (run / "finished").touch()
    return last


def build_rows(task: str, dense: Path, out: Path, seeds: list[int], structured: Path | None) -> list[Row]:
    """Write (or find) every folder the rows run on."""
    ov_fp32 = from_folder(dense, out / "openvino-fp32", format="openvino")
    rows = [
        Row(FP32, (str(dense),), "torch"),
        Row(COMPILE, (str(dense),), "torch", compiled=True),
        Row(TORCH_INT8, (from_folder(dense, out / "torch-int8", int8=True),), "torch"),
        Row(ORT_FP32, (from_folder(dense, out / "onnx-fp32", format="onnx"),), "onnxruntime"),
        Row(ORT_DYNAMIC, (from_folder(dense, out / "onnx-dynamic", format="onnx", int8=True),), "onnxruntime"),
        Row(OV_FP32, (ov_fp32,), "openvino", precision="f32"),
    ]
    if has_bf16():
        rows.append(Row(OV_BF16, (ov_fp32,), "openvino"))
    if structured is not None:  # cut heads and neurons, reloaded from the folder alone
        rows.append(Row(STRUCTURED_TORCH, (from_checkpoint(structured, out / "structured-50", shrink=True),), "torch"))
        shrunk_ov = from_checkpoint(structured, out / "structured-50-openvino", shrink=True, format="openvino")
        rows.append(Row(STRUCTURED_OV, (shrunk_ov,), "openvino", precision="f32"))
    seeded: dict[str, list[str]] = {name: [] for name in (ORT_STATIC, OV_PTQ, NNCF_QAT, OURS_OV, OURS_ORT)}
    for seed in seeds:
        int8 = {"int8": True, "calibration": calibration_texts(task, seed)}
        seeded[ORT_STATIC].append(from_folder(dense, out / f"onnx-static-{seed}", format="onnx", **int8))
        seeded[OV_PTQ].append(from_folder(dense, out / f"openvino-ptq-{seed}", format="openvino", **int8))
        plain = train_qat(task, dense, out / f"nncf-qat-{seed}", seed, distil=False)
        seeded[NNCF_QAT].append(qat_export(plain, out / f"nncf-qat-{seed}" / "openvino", "openvino"))
        ours = train_qat(task, dense, out / f"ours-qat-{seed}", seed, distil=True)
        seeded[OURS_OV].append(qat_export(ours, out / f"ours-qat-{seed}" / "openvino", "openvino"))
        seeded[OURS_ORT].append(qat_export(ours, out / f"ours-qat-{seed}" / "onnx", "onnx"))
    runtimes = {ORT_STATIC: "onnxruntime", OURS_ORT: "onnxruntime"}
    return rows + [Row(name, tuple(folders), runtimes.get(name, "openvino")) for name, folders in seeded.items()]


def scores_of(task: str, rows: list[Row], cache: Path) -> dict[str, list[float]]:
    """Dev-set metric of every folder of every row (torch.compile: not scored), cached in ``cache``."""
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    inputs, gold = dev_set(task)
    result = {}
    for row in rows:
        if row.compiled:
            continue
        values = []
        for folder in row.folders:
            key = f"{folder}|{row.runtime}|{row.precision}"
            if key not in saved:
                saved[key] = score(task, Path(folder), inputs, gold, row.runtime, row.precision)
                cache.write_text(json.dumps(saved, indent=1))
            values.append(saved[key])
        result[row.name] = values
    return result


def latency_in_fresh_process(rows: list[Row], rounds: int) -> dict[str, dict[str, float]]:
    """{shape: {row: median ms}}, timed by this script in a new process (see :func:`time_rows`)."""
    spec = json.dumps({"rows": [asdict(row) for row in rows], "rounds": rounds})
    command = [sys.executable, __file__, "--time_rows", spec]
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_rows(spec: dict[str, Any], threads: int = 2, runs: int = 3) -> dict[str, dict[str, float]]:
    """Median ms per call of each row's first folder on its runtime, rows interleaved in every round."""
    import torch
    from transformers import AutoConfig

    from lightning_memopt.deploy.latency import fixed_batch
    from lightning_memopt.deploy.load import load_pretrained
    from lightning_memopt.deploy.onnx import model_input_names
    from lightning_memopt.deploy.predict import load_logits

    torch.set_num_threads(threads)
    rows = [Row(**{**row, "folders": tuple(row["folders"])}) for row in spec["rows"]]
    calls = {}
    for row in rows:
        folder = Path(row.folders[0])
        if row.compiled:
            base = load_pretrained(folder)
            names = model_input_names(base)  # the compiled wrapper's forward takes (*args, **kwargs)
            model = torch.compile(base)

            def call(batch: dict, model: Any = model, names: list[str] = names) -> Any:
                with torch.inference_mode():
                    return model(**{name: torch.from_numpy(batch[name]) for name in names}).logits

            calls[row.name] = (call, names, folder)
        else:
            logits, names = load_logits(folder, row.runtime, threads, row.precision)
            calls[row.name] = (logits, names, folder)
    timings: dict[str, dict[str, float]] = {}
    for size, length in SHAPES:
        batches = {
            name: fixed_batch(AutoConfig.from_pretrained(folder).vocab_size, names, size, length)
            for name, (_, names, folder) in calls.items()
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for name, (call, _, _) in calls.items():
            call(batches[name])  # warm-up (and torch.compile's compilation for this shape)
        for _ in range(spec["rounds"]):
            for name, (call, _, _) in calls.items():
                started = time.perf_counter()
                for _ in range(runs):
                    call(batches[name])
                times[name].append((time.perf_counter() - started) / runs * 1000)
        timings[f"{size}x{length}"] = {name: round(statistics.median(values), 2) for name, values in times.items()}
    return timings


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def aims(scores: dict[str, list[float]], latency: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Issue 27's figures for one artefact, our QAT export on its fastest runtime: its speed over the fastest PTQ
    row's and its metric minus the most accurate PTQ row's, fp32's and NNCF's QAT's (points: x100, mean over
    seeds); speed at batch 8 x 128."""
    ms = latency["8x128"]
    ours = min(OURS_ROWS, key=lambda name: ms[name])
    best_ptq = max(PTQ_ROWS, key=lambda name: mean(scores[name]))
    fastest_ptq = min(PTQ_ROWS, key=lambda name: ms[name])
    figures: dict[str, Any] = {
        "qat_row": ours,
        "best_ptq_row": best_ptq,
        "fastest_ptq_row": fastest_ptq,
        "qat_speed_vs_best_ptq": round(ms[fastest_ptq] / ms[ours], 3),
        "qat_minus_best_ptq": round(100 * (mean(scores[ours]) - mean(scores[best_ptq])), 2),
        "qat_minus_fp32": round(100 * (mean(scores[ours]) - mean(scores[FP32])), 2),
        "qat_minus_nncf_qat": round(100 * (mean(scores[ours]) - mean(scores[NNCF_QAT])), 2),
    }
    if STRUCTURED_TORCH in ms:
        figures["structured_speedup_torch"] = round(ms[FP32] / ms[STRUCTURED_TORCH], 3)
        figures["structured_speedup_openvino"] = round(ms[OV_FP32] / ms[STRUCTURED_OV], 3)
    return figures


AIM_BOUNDS = {
    "qat_speed_vs_best_ptq": 0.95,
    "qat_minus_best_ptq": 0.0,
    "qat_minus_fp32": -0.3,
    "qat_minus_nncf_qat": 0.0,
    "structured_speedup_torch": 1.6,  # against torch fp32, batch 8 x 128
    "structured_speedup_openvino": 1.6,  # against OpenVINO fp32, batch 8 x 128
}


def render_task(task: str, payload: dict[str, Any]) -> list[str]:
    rows, dense = payload["rows"], payload["rows"][FP32]
    lines = [
        f"## {task}",
        "",
        f"- Command: `{payload['command']}`",
        f"- Date: {payload['date']}; seeds {payload['seeds']}; dense model {payload['dense']}",
        "",
        "| row | dev metric (mean ± sd over seeds) | seeds | MB | size ratio | 8x128 ms | 1x128 ms | speed-up 8x128 "
        "| speed-up 1x128 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        values = row["scores"]
        if not values:
            metric = "not scored (torch fp32's weights and operations)"
        elif len(values) == 1:
            metric = f"{values[0]:.4f}"
        else:
            metric = f"{mean(values):.4f} ± {statistics.stdev(values):.4f}"
        ms = row["latency_ms"]
        lines.append(
            f"| {name} | {metric} | {len(values) or ''} | {row['weights_bytes'] / 1e6:.1f} "
            f"| {row['weights_bytes'] / dense['weights_bytes']:.3f} | {ms['8x128']:.1f} | {ms['1x128']:.1f} "
            f"| {dense['latency_ms']['8x128'] / ms['8x128']:.2f}x | {dense['latency_ms']['1x128'] / ms['1x128']:.2f}x |"
        )
    figures = payload["aims"]
    lines += [
        "",
        f"Our QAT export on its fastest runtime: {figures['qat_row']}. Most accurate PTQ row: "
        f"{figures['best_ptq_row']}; fastest: {figures['fastest_ptq_row']}.",
        "",
    ]
    lines += ["| aim | measured | met |", "|---|---|---|"]
    for key, bound in AIM_BOUNDS.items():
        if key not in figures:
            continue
        lines.append(f"| {key} >= {bound} | {figures[key]} | {'yes' if figures[key] >= bound else 'no'} |")
    return [*lines, ""]


def write_page() -> Path:
    """docs/results/deploy.md from every task's saved JSON, with docs/results/notes/deploy.md appended."""
    payloads = {
        task: json.loads(path.read_text()) for task in RECIPES if (path := RESULTS / f"deploy-{task}.json").exists()
    }
    if not payloads:
        raise SystemExit(f"--render: no saved results in {RESULTS}/deploy-<task>.json; run the benchmark first.")
    first = next(iter(payloads.values()))
    flags = first["cpu_flags"]
    int8_dot = [flag for flag in flags if flag in ("avx512_vnni", "avx_vnni", "amx_int8")]
    lines = [
        "# Deployment: every CPU runtime, and our QAT against the runtimes' own int8 (issue 27)",
        "",
        f"- Machine: {first['machine']}",
        f"- CPU flags: {', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}",
        f"- int8 dot-product instructions: {', '.join(int8_dot) if int8_dot else 'none (no VNNI, no AMX): int8 kernels cannot run faster than float32 by much on this CPU'}",
        "",
        "Metric: dev set through `memopt predict`'s code on each row's runtime (entity F1 for NER, accuracy for SST-2). "
        "Size: weights on disk over the dense `model.safetensors`. Latency: median of interleaved rounds in a fresh "
        "process, 2 threads; speed-up = torch fp32 time / row time. Aims in points (x100) on the mean over seeds; "
        "speed at batch 8 x 128 against the fastest PTQ row.",
        "",
    ]
    for task, payload in payloads.items():
        lines += render_task(task, payload)
    notes = PAGES / "notes" / "deploy.md"
    if notes.exists():
        lines.append(notes.read_text().rstrip("\n"))
    page = PAGES / "deploy.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(RECIPES), default="ner")
    parser.add_argument("--dense", type=Path, help="the fine-tuned dense model, an exported folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--structured",
        type=Path,
        help="a structured 50 % pruning run's checkpoint (recipes/pruning/structured-50.yaml)",
    )
    parser.add_argument("--out", type=Path, help="working folder (default runs/deploy-<task>)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--render", action="store_true", help="rewrite docs/results/deploy.md from the saved JSON")
    parser.add_argument("--time_rows", help=argparse.SUPPRESS)  # the fresh timing process
    args = parser.parse_args()
    if args.time_rows:
        print(json.dumps(time_rows(json.loads(args.time_rows))))
        return
    if args.render:
        print(f"Wrote {write_page()}")
        return
    if args.dense is None or not (args.dense / "config.json").exists():
        parser.error(f"--dense {args.dense}: give the fine-tuned model's exported folder (memopt export).")
    out = (args.out or PROJECT_ROOT / "runs" / f"deploy-{args.task}").resolve()  # the fit children run elsewhere
    out.mkdir(parents=True, exist_ok=True)
    recorded, dense = out / "dense.txt", str(args.dense.resolve())
    if recorded.exists() and recorded.read_text().strip() != dense:
        parser.error(f"--out {out} holds the rows of {recorded.read_text().strip()}; give another --out for {dense}.")
    recorded.write_text(dense + "\n")
    rows = build_rows(args.task, args.dense.resolve(), out, args.seeds, args.structured)
    scores = scores_of(args.task, rows, out / "scores.json")
    latency = latency_in_fresh_process(rows, args.rounds)
    payload = payload_header("deploy.py") | {
        "cpu_flags": cpu_flags(),
        "task": args.task,
        "dense": str(args.dense),
        "seeds": args.seeds,
        "rows": {
            row.name: {
                "scores": scores.get(row.name, []),
                "weights_bytes": weights_bytes(Path(row.folders[0])),
                "latency_ms": {shape: latency[shape][row.name] for shape in latency},
                "runtime": row.runtime,
                "folders": list(row.folders),
            }
            for row in rows
        },
        "aims": aims(scores, latency),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"deploy-{args.task}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"Wrote {write_page()}")


if __name__ == "__main__":
    main()
