"""CPU latency of exported folders on their own runtimes, measured side by side.

Each folder runs on the runtime ``memopt predict`` would pick (OpenVINO, ONNX Runtime or torch) on a fixed
batch of token ids inside its own vocabulary (a trimmed vocabulary is smaller); the folders take turns in
every round, so a noisy machine slows them alike, and the median per call is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lightning_memopt.deploy.predict import load_logits, runtime_of


def fixed_batch(vocab_size: int, names: list[str], size: int, length: int) -> dict[str, np.ndarray]:
    """Token ids drawn with a fixed seed below ``vocab_size``, full attention, one segment."""
    ids = np.random.default_rng(0).integers(1, vocab_size, (size, length), dtype=np.int64)
    ones, zeros = np.ones_like(ids), np.zeros_like(ids)
    return {name: {"input_ids": ids, "attention_mask": ones}.get(name, zeros) for name in names}


def runner(folder: Path, size: int, length: int, threads: int) -> Callable[[], object]:
    """One call of the folder's model on its fixed batch."""
    from transformers import AutoConfig

    logits, names = load_logits(folder, runtime_of(folder, "auto"), threads)
    batch = fixed_batch(AutoConfig.from_pretrained(folder).vocab_size, names, size, length)
    return lambda: logits(batch)


def median_latency_ms(
    folders: Mapping[str, Path], size: int = 8, length: int = 128, threads: int = 2, rounds: int = 5, runs: int = 3
) -> dict[str, float]:
    """Median milliseconds per call of each folder's model, the folders interleaved in every round."""
    import torch

    torch.set_num_threads(threads)
    calls = {name: runner(Path(folder), size, length, threads) for name, folder in folders.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(runs):
                call()
            times[name].append((time.perf_counter() - started) / runs * 1000)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def latency_in_fresh_process(
    folders: Mapping[str, Path], sizes: tuple[int, ...] = (8, 1), length: int = 128, threads: int = 2, rounds: int = 5
) -> dict[str, dict[str, float]]:
    """:func:`median_latency_ms` per batch size, run in a new Python process that does nothing else (no export
    or calibration state, no compiled models left over from them)."""
    import json
    import subprocess
    import sys

    spec = {"folders": {name: str(folder) for name, folder in folders.items()}, "sizes": list(sizes)}
    spec |= {"length": length, "threads": threads, "rounds": rounds}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_memopt.deploy.latency", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _main(spec_json: str) -> None:
    import json

    spec = json.loads(spec_json)
    folders = {name: Path(folder) for name, folder in spec["folders"].items()}
    timings = {
        f"{size}x{spec['length']}": median_latency_ms(
            folders, size=size, length=spec["length"], threads=spec["threads"], rounds=spec["rounds"]
        )
        for size in spec["sizes"]
    }
    print(json.dumps(timings))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
