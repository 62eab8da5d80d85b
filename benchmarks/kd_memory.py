"""Extra peak memory of the KD loss at LLM scale on CPU: one pass against chunks (``KnowledgeDistillation(chunk_rows=)``).

Each variant runs in its own process on one 2,048-token sequence over a 32,000-token vocabulary (one float32
logits tensor: 250 MiB). The student logits require grad and are either

- a leaf tensor (``leaf``), or
- the output of an LM head (``LM head``): hidden states ``[1, 2048, H]`` (requiring grad, as a model's body
  gives them) times a weight ``[H, 32000]`` that requires grad, so the logits are not a leaf and their
  gradient flows on into the head's matmul backward (``H`` = ``--hidden``), or
- never made (``LM head, fused``, ``KnowledgeDistillation(fuse_head=True)``): the loss takes the student's and
  the teacher's hidden states and LM heads (``head_chunked_kl``) and makes each chunk's logits itself.

The inputs (teacher logits, student logits, hidden states and weight) are made first; then the KD loss
and its backward pass run, and the peak resident memory beyond what was resident before is the extra,
compared with the size of one full-sequence logits tensor. The gradient of the logits (one logits-sized
tensor, which any loss on them produces) counts as extra; so do the gradients of the head's weight and of
the hidden states, which a training step produces with any loss: the table also gives the extra net of
the weight's gradient. glibc's allocator is asked to return large blocks (``MALLOC_MMAP_THRESHOLD_``) so
resident memory follows live tensors.

    python benchmarks/kd_memory.py [--sequence 2048] [--vocab 32000] [--hidden 1024] [--chunk_rows 256 64]

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
LOGITS = {"leaf": "leaf", "head": "LM head", "fused": "LM head, fused"}


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


def child(logits: str, sequence: int, vocab: int, hidden: int, chunk_rows: int | None) -> dict:
    import torch

    from lightning_memopt.distillation.losses import head_chunked_kl, soft_target_kl

    torch.manual_seed(0)
    weight_grad_mib = 0.0
    if logits == "fused":  # no logits: hidden states and heads on both sides
        states = torch.randn(1, sequence, hidden, requires_grad=True)
        head, teacher_head = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
        teacher_head.requires_grad_(False)
        teacher_states = torch.randn(1, sequence, hidden)
        weight_grad_mib = head.weight.numel() * head.weight.element_size() / MIB
        Path("/proc/self/clear_refs").write_text("5")
        before = rss_mib()
        loss = head_chunked_kl(states, head, teacher_states, teacher_head, 2.0, None, chunk_rows or 256)
        loss.backward()
        extra = peak_mib() - before
        teacher_output_mib = teacher_states.numel() * 4 / MIB
        return row(logits, chunk_rows, extra, weight_grad_mib, teacher_output_mib, loss.item())
    teacher = torch.randn(1, sequence, vocab)
    if logits == "leaf":
        student = torch.randn(1, sequence, vocab, requires_grad=True)  # its gradient is taken over, not copied
    else:
        states = torch.randn(1, sequence, hidden, requires_grad=True)
        weight = (torch.randn(hidden, vocab) / hidden**0.5).requires_grad_()
        with torch.no_grad():
            student = states @ weight  # made without a graph: the matmul's inputs exist, not its temporaries
        student = states @ weight  # the same values, now a non-leaf with a graph back to the head
        weight_grad_mib = weight.numel() * weight.element_size() / MIB
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what is resident now
    before = rss_mib()
    loss = soft_target_kl(student, teacher, 2.0, None, chunk_rows)
    loss.backward()
    extra = peak_mib() - before
    return row(logits, chunk_rows, extra, weight_grad_mib, teacher.numel() * 4 / MIB, loss.item())


def row(logits: str, chunk_rows: int | None, extra: float, weight_grad: float, teacher: float, loss: float) -> dict:
    return {
        "logits": LOGITS[logits],
        "chunk_rows": chunk_rows,
        "extra_peak_mib": round(extra, 1),
        "head_weight_grad_mib": round(weight_grad, 1),
        "extra_beyond_weight_grad_mib": round(extra - weight_grad, 1),
        "teacher_output_mib": round(teacher, 1),  # what the KD step holds of the teacher besides its weights
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024, help="width of the LM head's input")
    parser.add_argument("--chunk_rows", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--_child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        logits, sequence, vocab, hidden, chunk = args._child
        chunk_rows = None if chunk == "none" else int(chunk)
        print(json.dumps(child(logits, int(sequence), int(vocab), int(hidden), chunk_rows)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    rows = {}
    chunks = [("one pass", "none")] + [(f"chunks of {n} positions", str(n)) for n in args.chunk_rows]
    for logits in LOGITS:
        for how, chunk in chunks if logits != "fused" else chunks[1:]:  # the fused loss always goes in chunks
            command = [sys.executable, __file__, "--_child", logits, str(args.sequence), str(args.vocab)]
            command += [str(args.hidden), chunk]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            rows[f"{LOGITS[logits]}, {how}"] = json.loads(done.stdout)
    logits_mib = args.sequence * args.vocab * 4 / MIB
    for row in rows.values():
        row["extra_in_logits_tensors"] = round(row["extra_peak_mib"] / logits_mib, 2)
        row["beyond_weight_grad_in_logits_tensors"] = round(row["extra_beyond_weight_grad_mib"] / logits_mib, 2)
        with_teacher = row["extra_beyond_weight_grad_mib"] + row["teacher_output_mib"]
        row["with_teacher_output_in_logits_tensors"] = round(with_teacher / logits_mib, 2)
    payload = {
        "command": "python benchmarks/kd_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": today(),
        "sequence": args.sequence,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "logits_mib": round(logits_mib, 1),
        "variants": rows,
        "extra_in_logits_tensors": {name: row["extra_in_logits_tensors"] for name, row in rows.items()},
        "with_teacher_output_in_logits_tensors": {
            name: row["with_teacher_output_in_logits_tensors"] for name, row in rows.items()
        },
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
        f"{logits_mib:.0f} MiB. Extra = peak resident memory of the KD loss and its backward pass beyond the "
        "inputs (teacher and student logits, and for the LM head its input and weight), the logits' own gradient "
        "included (each variant in its own process). Student logits are either a leaf tensor or the output of an "
        f"LM head (hidden states [1, {args.sequence}, {args.hidden}] times a weight [{args.hidden}, {args.vocab}], "
        "both requiring grad), whose backward pass also makes the weight's gradient "
        f"({args.hidden * args.vocab * 4 / MIB:.0f} MiB, which a training step makes with any loss): the "
        "columns 'beyond the head weight's gradient' leave it out. The fused loss never makes logits: it takes the hidden states and "
        "both heads (the teacher's output it holds is its hidden states, not its logits). The last column adds "
        "what the KD step holds of the teacher's output (its logits, or its hidden states when fused) to the extra "
        "beyond the weight's gradient: what distillation costs beyond the teacher's weights.",
        "",
        "| student logits, KD loss | extra peak MiB | in logits tensors | beyond the head weight's gradient, MiB "
        "| in logits tensors | teacher output held, MiB | with it, in logits tensors | loss |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {row['extra_peak_mib']} | {row['extra_in_logits_tensors']:.2f} "
            f"| {row['extra_beyond_weight_grad_mib']} | {row['beyond_weight_grad_in_logits_tensors']:.2f} "
            f"| {row['teacher_output_mib']} | {row['with_teacher_output_in_logits_tensors']:.2f} | {row['loss']:.6f} |"
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
