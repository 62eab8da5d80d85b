"""OpenVINOQuantizationAwareTraining against OpenVINO's own post-training int8 (NNCF) of the same dense model.

From a fine-tuned dense model (an exported folder) the script runs (unless --qat_checkpoint names a finished run)
`memopt fit` with recipes/quantization/openvino-qat.yaml, a short QAT fine-tune of that folder, then measures in
one run:

- the dev-set metric (entity F1 / accuracy through `memopt predict`'s code on each model's own runtime) of the
  dense model (torch fp32), NNCF's post-training int8 of it (OpenVINO, calibrated on 300 training sentences) and
  our QAT export (`memopt export --format openvino --int8 true`, the trained scales);
- weights on disk, and CPU latency (batch 8 x 128 and 1 x 128, 2 threads, interleaved rounds, fresh process).

The JSON carries issue 27's figures: qat_minus_best_ptq (points), qat_minus_fp32 (points) and
qat_speed_vs_best_ptq (the PTQ model's time / the QAT model's, batch 8 x 128).

    python benchmarks/openvino_qat.py --task ner --dense compressed/ner-small-600/teacher \
        --qat_checkpoint runs/openvino-qat/checkpoints/last.ckpt

Results: benchmarks/results/openvino-qat-<task>.json and docs/results/openvino-qat-<task>.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_FLAGS, PAGES, PROJECT_ROOT, RESULTS, cpu_flags, machine, today
from compress import dev_set, score, training_texts

from lightning_memopt.compress.final import calibration_subset, weights_bytes
from lightning_memopt.deploy.export import export_checkpoint, export_folder
from lightning_memopt.deploy.latency import latency_in_fresh_process

RECIPES = {
    "ner": ["recipes/ner/conll2003.yaml", "recipes/ner/conll2003-offline.yaml"],
    "sst2": ["recipes/classification/sst2.yaml", "recipes/classification/sst2-offline.yaml"],
}
DENSE, PTQ, QAT = "dense torch fp32", "NNCF post-training int8 (OpenVINO)", "our QAT int8 (OpenVINO)"


def run_qat(task: str, dense: Path, out: Path) -> Path:
    """``memopt fit`` with the OpenVINO QAT overlay from the dense folder, writing under ``out/run``."""
    run = out / "run"
    configs = [arg for path in [*RECIPES[task], "recipes/quantization/openvino-qat.yaml"] for arg in ("--config", path)]
    folders = [f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
               f"--checkpoint.dirpath={run / 'checkpoints'}", f"--last_checkpoint.dirpath={run / 'checkpoints'}"]  # fmt: skip
    args = [sys.executable, "-m", "lightning_memopt.cli", "fit", *configs, f"--model.model_name_or_path={dense}"]
    subprocess.run([*args, *folders, "--ckpt_path=auto"], check=True, cwd=PROJECT_ROOT)
    return run / "checkpoints" / "last.ckpt"


def measure(task: str, dense: Path, checkpoint: Path, out: Path) -> dict[str, Any]:
    folders = {DENSE: dense, PTQ: out / "ptq", QAT: out / "qat"}
    calibration = calibration_subset(training_texts(task), 300)
    export_folder(dense, folders[PTQ], format="openvino", int8=True, calibration=calibration, overwrite=True)
    export_checkpoint(checkpoint, folders[QAT], format="openvino", int8=True, overwrite=True, min_agreement=0.98)
    inputs, gold = dev_set(task)
    runtimes = {DENSE: "torch", PTQ: "openvino", QAT: "openvino"}
    scores = {name: score(task, folder, inputs, gold, runtimes[name]) for name, folder in folders.items()}
    latency = latency_in_fresh_process(folders, rounds=7)
    rows = {
        name: {
            "score": scores[name],
            "weights_bytes": weights_bytes(folder),
            "latency_ms": {shape: latency[shape][name] for shape in latency},
        }
        for name, folder in folders.items()
    }
    return {
        "rows": rows,
        "qat_minus_best_ptq": round(100 * (scores[QAT] - scores[PTQ]), 2),
        "qat_minus_fp32": round(100 * (scores[QAT] - scores[DENSE]), 2),
        "qat_speed_vs_best_ptq": round(latency["8x128"][PTQ] / latency["8x128"][QAT], 3),
    }


def render(payload: dict[str, Any]) -> list[str]:
    dense = payload["rows"][DENSE]
    lines = [
        f"# OpenVINO QAT against NNCF post-training int8 ({payload['task']})",
        "",
        f"- Command: `{payload['command']}`",
        f"- QAT run: `{payload['qat_command']}`",
        f"- Machine: {payload['machine']}",
        f"- CPU flags: {', '.join(payload['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}",
        f"- Date: {payload['date']}",
        "",
        "Dev-set metric through `memopt predict`'s code on each model's runtime (points: x100). Size: weights on "
        "disk over the dense `model.safetensors`. Latency: median of interleaved rounds in a fresh process, "
        "2 threads; speed-up = dense fp32 time / model time.",
        "",
        "| model | metric | size ratio | MB | 8x128 ms | 1x128 ms | speed-up 8x128 | speed-up 1x128 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in payload["rows"].items():
        ms = row["latency_ms"]
        lines.append(
            f"| {name} | {row['score']:.4f} | {row['weights_bytes'] / dense['weights_bytes']:.3f} "
            f"| {row['weights_bytes'] / 1e6:.1f} | {ms['8x128']:.1f} | {ms['1x128']:.1f} "
            f"| {dense['latency_ms']['8x128'] / ms['8x128']:.2f}x | {dense['latency_ms']['1x128'] / ms['1x128']:.2f}x |"
        )
    lines += ["", "## Aims (issue 27)", "", "| aim | measured | met |", "|---|---|---|"]
    for key, bound in (("qat_minus_best_ptq", 0.0), ("qat_minus_fp32", -0.3), ("qat_speed_vs_best_ptq", 0.95)):
        lines.append(f"| {key} >= {bound} | {payload[key]} | {'yes' if payload[key] >= bound else 'no'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(RECIPES), default="ner")
    parser.add_argument("--dense", type=Path, required=True, help="the fine-tuned dense model, an exported folder")
    parser.add_argument("--qat_checkpoint", type=Path, help="a finished QAT run's checkpoint (else it is trained)")
    parser.add_argument("--out", type=Path, default=Path("runs/openvino-qat-benchmark"))
    args = parser.parse_args()
    checkpoint = args.qat_checkpoint or run_qat(args.task, args.dense, args.out)
    qat_command = (
        f"memopt fit {' '.join('--config ' + c for c in RECIPES[args.task])} --config "
        f"recipes/quantization/openvino-qat.yaml --model.model_name_or_path={args.dense}"
    )
    payload = {
        "command": "python benchmarks/openvino_qat.py " + " ".join(sys.argv[1:]),
        "qat_command": qat_command,
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": today(),
        "task": args.task,
        **measure(args.task, args.dense, checkpoint, args.out),
    }
    name = f"openvino-qat-{args.task}"
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    notes = PAGES / "notes" / f"{name}.md"
    extra = ["", notes.read_text().rstrip("\n")] if notes.exists() else []
    page = PAGES / f"{name}.md"
    page.write_text("\n".join([*render(payload), *extra]) + "\n")
    print(f"Wrote {page}")


if __name__ == "__main__":
    main()
