"""Extra peak memory of the KD loss at LLM scale on CPU: one pass against chunks (``KnowledgeDistillation(chunk_rows=)``).

Each variant runs in its own process: student logits (requiring grad) and teacher logits of one
2,048-token sequence over a 32,000-token vocabulary are made first (262 MB each in float32), then the KD
loss and its backward pass run; the peak resident memory beyond what the inputs and the gradient take is
the loss's own extra, compared with the size of one full-sequence logits tensor. The gradient of the logits
(one logits-sized tensor, which any loss on them produces) counts as extra. glibc's allocator is asked
to return large blocks (``MALLOC_MMAP_THRESHOLD_``) so resident memory follows live tensors.

    python benchmarks/kd_memory.py [--sequence 2048] [--vocab 32000] [--chunk_rows 256]

Writes benchmarks/results/kd-memory.json and docs/results/kd-memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAGES, RESULTS, cpu_flags, machine, today

MIB = 2**20


def rss_mib() -> float:
    """Current resident memory (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(sequence: int, vocab: int, chunk_rows: int | None) -> dict:
    import torch

    from lightning_memopt.distillation.losses import soft_target_kl

    torch.manual_seed(0)
    student = torch.randn(1, sequence, vocab, requires_grad=True)  # its gradient is taken over, not copied
    teacher = torch.randn(1, sequence, vocab)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what is resident now
    before = rss_mib()
    loss = soft_target_kl(student, teacher, 2.0, None, chunk_rows)
    loss.backward()
    return {"extra_peak_mib": round(peak_mib() - before, 1), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk_rows", type=int, default=256)
    parser.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        sequence, vocab, chunk = args._child
        print(json.dumps(child(int(sequence), int(vocab), None if chunk == "none" else int(chunk))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    rows = {}
    for name, chunk in (("one pass", "none"), (f"chunks of {args.chunk_rows} positions", str(args.chunk_rows))):
        command = [sys.executable, __file__, "--_child", str(args.sequence), str(args.vocab), chunk]
        rows[name] = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    logits_mib = args.sequence * args.vocab * 4 / MIB
    payload = {
        "command": "python benchmarks/kd_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": today(),
        "sequence": args.sequence,
        "vocab": args.vocab,
        "logits_mib": round(logits_mib, 1),
        "variants": rows,
        "extra_in_logits_tensors": {name: round(row["extra_peak_mib"] / logits_mib, 2) for name, row in rows.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kd-memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# KD loss: extra peak memory at LLM scale (CPU)",
        "",
        f"- Command: `{payload['command']}`",
        f"- Machine: {payload['machine']}",
        f"- CPU flags: {', '.join(payload['cpu_flags']) or 'none of the AVX-512/AMX ones'}",
        f"- Date: {payload['date']}",
        "",
        f"One sequence of {args.sequence} tokens over a {args.vocab:,}-token vocabulary: one float32 logits tensor is "
        f"{logits_mib:.0f} MiB. Extra = peak resident memory of the loss and its backward pass beyond the two "
        "logits tensors, the logits' own gradient included (each variant in its own process).",
        "",
        "| KD loss | extra peak MiB | in logits tensors | loss |",
        "|---|---|---|---|",
        *(
            f"| {name} | {row['extra_peak_mib']} | {payload['extra_in_logits_tensors'][name]:.2f} | {row['loss']:.6f} |"
            for name, row in rows.items()
        ),
        "",
    ]
    notes = PAGES / "notes" / "kd-memory.md"  # hand notes on the figures, kept across reruns
    if notes.exists():
        lines += [notes.read_text().rstrip("\n"), ""]
    (PAGES / "kd-memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
