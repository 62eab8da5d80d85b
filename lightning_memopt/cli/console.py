"""What ``memopt`` prints around the work: the package's log lines, and one clear line per user error.

A user error (a bad value, a missing or unreadable file, a refused checkpoint, an unsupported
combination) ends the command with ``memopt: error: <message>`` on stderr and exit status 2. The
message is the deepest such error in the exception chain, which is where our own explanation is:
jsonargparse wraps a constructor's ``ValueError`` in its own "does not validate" report. Anything
else is a bug and keeps its traceback. ``--debug`` (or ``MEMOPT_DEBUG=1``) shows every traceback.

Example:
    >>> try:
    ...     try:
    ...         raise ValueError("--model.alpha must be in [0, 1], got 1.5.")
    ...     except ValueError as inner:
    ...         raise TypeError("Does not validate against any of the Union subtypes") from inner
    ... except TypeError as outer:
    ...     print(user_error_message(outer))
    --model.alpha must be in [0, 1], got 1.5.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException

DEBUG_FLAG, QUIET_FLAG, VERBOSE_FLAG = "--debug", "--quiet", "--verbose"
DEBUG_ENV = "MEMOPT_DEBUG"
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    ModuleNotFoundError,  # an extra to install
    ArgumentError,
    MisconfigurationException,
)
EXIT_USER_ERROR = 2
PARSER_KEY = re.compile(r'Parser key "([^"]+)"')


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        suppressed = current.__suppress_context__  # `raise ... from None`: the context is not part of it
        current = current.__cause__ if current.__cause__ is not None else None if suppressed else current.__context__


def user_error_message(error: BaseException) -> str | None:
    """The message of the deepest user error in ``error``'s chain, on one line; ``None`` for a bug."""
    chain = list(_chain(error))
    found = [e for e in chain if isinstance(e, USER_ERRORS)]
    if not found:
        return None
    message = " ".join(str(found[-1]).split())
    keys: list[str] = []  # jsonargparse names the option in its outer reports, outermost first
    for e in chain:
        if (match := PARSER_KEY.search(str(e))) and match.group(1) not in keys:
            keys.append(match.group(1))
    if keys and keys[-1] not in message:
        message = f"--{'.'.join(keys)}: {message}"
    return message


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def take_console_flags(argv: list[str]) -> list[str]:
    """Apply and remove ``--debug``, ``--quiet`` and ``--verbose``; return the rest of ``argv``."""
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"  # processes Lightning launches for other ranks see it too
    level = logging.WARNING if QUIET_FLAG in argv else logging.DEBUG if VERBOSE_FLAG in argv else logging.INFO
    configure_logging(level)
    return [arg for arg in argv if arg not in (DEBUG_FLAG, QUIET_FLAG, VERBOSE_FLAG)]


class CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is now (tests and notebooks replace it)."""

    memopt = True

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send the package's log lines (which data scheme was found, example counts...) to stderr."""
    logger = logging.getLogger("lightning_memopt")
    logger.setLevel(level)
    if not any(getattr(handler, "memopt", False) for handler in logger.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def exit_with_user_error(error: BaseException) -> None:
    """Print ``error`` as one line and exit 2, when it is a user error and no traceback was asked for."""
    message = user_error_message(error)
    if message is None or debug_requested(sys.argv):
        return
    print(f"memopt: error: {message} (run with --debug for the traceback)", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR) from None
