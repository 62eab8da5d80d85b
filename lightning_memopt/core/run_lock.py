"""One fit at a time per run folder: a lock file naming its holder, taken over when the holder is gone.

Two fits started in the same folder would overwrite each other's ``last.ckpt``. The first takes
``<folder>/.memopt.lock`` (created exclusively, holding host, PID and command); a second gets
:class:`RunFolderBusy` naming the holder. A lock whose process no longer runs on this host (a run
killed with ``kill -9``) is taken over; one held on another host is respected.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder):
    ...     RunLock(folder).acquire()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_memopt.core.run_lock.RunFolderBusy: ...
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".memopt.lock"
_HELD: list[RunLock] = []  # this process's locks, released together when a command ends however it ends


class RunFolderBusy(FileExistsError):
    """Another run writes to this folder now."""


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run folder; a context manager, or :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": sys.argv})
        for _ in range(2):
            try:
                with open(self.path, "x", encoding="utf-8") as stream:
                    stream.write(record)
                self.held = True
                _HELD.append(self)
                return
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # its run was killed: take the folder over
                    continue
                raise RunFolderBusy(
                    f"{self.path.parent} is in use by another run (PID {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}); give this run its own folder with --trainer.default_root_dir and the "
                    f"checkpoint dirpaths, or wait for it to end (delete {self.path} if that run is gone)."
                ) from None
        raise RunFolderBusy(f"Could not take the lock {self.path}; delete it if no run uses the folder.")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self in _HELD:
            _HELD.remove(self)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def release_all() -> None:
    """Release every lock this process holds (the end of a command, successful or not)."""
    for lock in list(_HELD):
        lock.release()
