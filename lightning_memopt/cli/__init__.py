"""The ``memopt`` command: one module per subcommand, each thin (parse, call the library, print).

Examples::

    memopt fit --config recipes/ner/conll2003.yaml
    memopt fit --config recipes/ner/conll2003.yaml --config recipes/strategies/ddp.yaml --trainer.devices 4
    memopt validate --config recipes/ner/conll2003.yaml --ckpt_path runs/ner-conll2003/checkpoints/last.ckpt
    memopt export --ckpt_path runs/ner-conll2003/checkpoints/last.ckpt --output_dir exported/ner
    memopt student --teacher runs/ner-conll2003/checkpoints/last.ckpt --layers [0,2,4] --output_dir students/ner-l3
    memopt estimate --config recipes/ner/conll2003.yaml --trainer.devices 2 --device_memory 16GiB
    memopt predict --model exported/ner --input news.txt --output news.conll
    memopt compress --plan recipes/compress/ner-small.yaml --teacher runs/ner-conll2003/checkpoints/last.ckpt \
        --output_dir compressed/ner-small --config recipes/ner/conll2003.yaml
    memopt report compressed/ner-small
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lightning_memopt.cli.console import exit_with_user_error, take_console_flags
from lightning_memopt.cli.fit import MemoptCLI, run_cli
from lightning_memopt.core.recipes import recipe_classes


def _commands() -> dict[str, Callable[[Sequence[str]], None]]:
    from lightning_memopt.cli.compress import compress_command
    from lightning_memopt.cli.estimate import estimate_command
    from lightning_memopt.cli.export import export_command
    from lightning_memopt.cli.predict import predict_command
    from lightning_memopt.cli.report import report_command
    from lightning_memopt.cli.student import student_command

    return {
        "export": export_command,
        "student": student_command,
        "estimate": estimate_command,
        "predict": predict_command,
        "compress": compress_command,
        "report": report_command,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``memopt`` console script: a user error ends it with one line and status 2.

    ``--debug`` shows tracebacks, ``--quiet`` / ``--verbose`` set the log level (INFO by default).
    """
    given = take_console_flags(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        sys.argv = [sys.argv[0], *given]  # LightningCLI (and its launcher of other ranks) read sys.argv
    commands = _commands()
    try:
        if given and given[0] in commands:
            commands[given[0]](given[1:])
        elif given and given[0] in ("fit", "validate", "test") and {"-h", "--help"} & set(given):
            print_fit_help(given)
        else:
            run_cli(None if argv is None else given)
    except Exception as error:
        exit_with_user_error(error)
        raise


def print_fit_help(argv: Sequence[str]) -> None:
    """LightningCLI's help, then the options of the recipe's model and data classes with their descriptions."""
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both sys.argv and args are given
    try:
        for extra in ([], *(["--" + key + ".help", name] for key, name in recipe_classes(argv).items())):
            if extra:
                print(f"\nOptions of {extra[1]} ({extra[0].removesuffix('.help')}.*):\n", flush=True)
            try:
                run_cli([argv[0], *([] if extra else ["--help"]), *extra])
            except SystemExit as done:
                if done.code not in (0, None):
                    raise
    finally:
        sys.argv = saved


__all__ = ["MemoptCLI", "main", "print_fit_help", "run_cli"]
