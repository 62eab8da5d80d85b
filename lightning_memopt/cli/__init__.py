"""The ``memopt`` command: one module per subcommand, each thin (parse, call the library, print).

Examples::

    memopt fit --config recipes/ner/conll2003.yaml
    memopt fit --config recipes/ner/conll2003.yaml --config recipes/strategies/ddp.yaml --trainer.devices 4
    memopt validate --config recipes/ner/conll2003.yaml --ckpt_path runs/ner-conll2003/checkpoints/last.ckpt
    memopt export --ckpt_path runs/ner-conll2003/checkpoints/last.ckpt --output_dir exported/ner
    memopt student --teacher runs/ner-conll2003/checkpoints/last.ckpt --layers [0,2,4] --output_dir students/ner-l3
    memopt estimate --config recipes/ner/conll2003.yaml --trainer.devices 2 --device_memory 16GiB
    memopt predict --model exported/ner --input news.txt --output news.conll
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lightning_memopt.cli.console import exit_with_user_error, take_console_flags
from lightning_memopt.cli.fit import MemoptCLI, run_cli


def _commands() -> dict[str, Callable[[Sequence[str]], None]]:
    from lightning_memopt.cli.estimate import estimate_command
    from lightning_memopt.cli.export import export_command
    from lightning_memopt.cli.predict import predict_command
    from lightning_memopt.cli.student import student_command

    return {
        "export": export_command,
        "student": student_command,
        "estimate": estimate_command,
        "predict": predict_command,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``memopt`` console script: a user error ends it with one line and status 2.

    ``--debug`` shows tracebacks, ``--quiet`` / ``--verbose`` set the log level (INFO by default).
    """
    given = take_console_flags(list(sys.argv[1:] if argv is None else argv))
    commands = _commands()
    try:
        if given and given[0] in commands:
            commands[given[0]](given[1:])
        else:
            run_cli(given)
    except Exception as error:
        exit_with_user_error(error)
        raise


__all__ = ["MemoptCLI", "main", "run_cli"]
