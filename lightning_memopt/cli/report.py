"""``memopt report D``: a Markdown page with plots of a ``memopt compress`` run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_memopt.compress.report import write_report


def report_command(argv: Sequence[str]) -> None:
    """``memopt report D``: write ``D/report.md`` with the trade-off, stage curves and per-layer sparsity."""
    parser = argparse.ArgumentParser(prog="memopt report", description=report_command.__doc__)
    parser.add_argument("output_dir", help="The --output_dir of a memopt compress run (finished or not).")
    args = parser.parse_args(list(argv))
    print(f"Report: {write_report(args.output_dir)}")
