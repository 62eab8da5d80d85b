"""``memopt compress``: run a compression plan's stages from a teacher to a deployable model folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_memopt.compress import compress, read_plan

USAGE = """memopt compress --plan PLAN --teacher TEACHER --output_dir D [RECIPE ARGUMENTS ...]

The recipe arguments are those of `memopt fit` (e.g. --config recipes/ner/conll2003.yaml --config
recipes/ner/conll2003-offline.yaml --config recipes/strategies/ddp.yaml); every stage runs with them."""


def true_or_false(value: str) -> bool:
    """``true`` or ``false`` (any case), as ``memopt fit`` spells its switches."""
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def compress_command(argv: Sequence[str]) -> None:
    """``memopt compress``: train a plan's stages in order, resumably, and write ``D/final``."""
    parser = argparse.ArgumentParser(prog="memopt compress", usage=USAGE, description=compress_command.__doc__)
    parser.add_argument("--plan", required=True, help="A plan YAML (recipes/compress/*.yaml).")
    parser.add_argument(
        "--teacher", required=True, help="The fine-tuned model: a memopt fit checkpoint, or a model folder."
    )
    parser.add_argument("--output_dir", required=True, help="Where stages, compress.json and final/ are written.")
    parser.add_argument(
        "--restart_from", default=None, help="Train this stage and the ones after it again (after a plan change)."
    )
    parser.add_argument(
        "--latency",
        type=true_or_false,
        default=True,
        metavar="{true,false}",
        help="Time the CPU latency of the teacher, each stage and final/ at the end, into compress.json "
        "(default true; false skips the timing).",
    )
    args, recipe_args = parser.parse_known_args(list(argv))
    if not recipe_args:
        parser.error("give the task recipe, e.g. --config recipes/ner/conll2003.yaml")
    plan = read_plan(args.plan)
    compress(
        plan,
        args.teacher,
        args.output_dir,
        recipe_args,
        restart_from=args.restart_from,
        latency=args.latency,
        command=["memopt", "compress", *argv],
    )
