"""Checkpoint writing that never leaves a half-written file behind.

Lightning's default ``TorchCheckpointIO`` writes straight to the destination, so a run killed while
saving can leave a truncated ``last.ckpt`` that ``--ckpt_path last`` then fails to load. This plugin
writes to a temporary file in the same folder, flushes it to disk, and renames it over the target
(``os.replace`` is atomic on POSIX and Windows). A run killed by ``kill -9`` mid-write cannot clean up
after itself, so each process's first save into a folder removes the partial files that dead
processes left there (their names carry the writer's process id).

Example (recipe YAML)::

    trainer:
      plugins:
        - class_path: lightning_memopt.AtomicCheckpointIO
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_memopt.core.run_lock import process_alive

PARTIAL_SUFFIX = ".partial"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_orphaned_partials(folder: Path) -> list[Path]:
    """Delete the ``.<name>.<pid>.<random>.partial`` files of processes that no longer run; return them.

    Partial files from releases before the process id was in the name (``.<name>.<random>.partial``) are
    orphans by construction and go too.
    """
    removed = []
    for partial in folder.glob(f".*{PARTIAL_SUFFIX}"):
        parts = partial.name[: -len(PARTIAL_SUFFIX)].split(".")
        writer = parts[-2] if len(parts) >= 4 else ""
        if writer.isdigit() and process_alive(int(writer)):
            continue
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)  # an export folder that never finished
        else:
            partial.unlink(missing_ok=True)
        removed.append(partial)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing and whose loads never unpickle code.

    Loading defaults to ``weights_only=True`` for local and remote (``https://``) paths alike;
    Lightning's own default is ``False`` for remote checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cleaned: set[Path] = set()

    @override
    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}.")
        if get_filesystem(path).protocol not in ("file", ("file", "local")) and "://" in str(path):
            super().save_checkpoint(checkpoint, path)  # remote stores: their own upload semantics
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.parent not in self.cleaned:
            remove_orphaned_partials(target.parent)
            self.cleaned.add(target.parent)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=target.parent
        )
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o666 & ~_current_umask())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def follow_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode a plain ``open``/``mkdir`` would (some writers use 0600)."""
    mask = _current_umask()
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False, option: str = "--output_dir") -> Iterator[Path]:
    """Write a folder all at once: into a hidden sibling, moved into place only when the block succeeds.

    A ``target`` that already holds files is refused unless ``overwrite``, which replaces it whole (never a
    mix of old and new files). The folder's mode follows the umask, like ``mkdir``.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{option} {target} is a file; give a folder (it is created if missing).")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{option} {target} already holds files; pass --overwrite true to replace the folder whole, or write "
            "to a new one."
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    except PermissionError:
        raise PermissionError(
            f"{option} {target}: cannot write in {target.parent}; choose a folder you can write to."
        ) from None
    os.chmod(work, 0o777 & ~_current_umask())
    try:
        yield work
        follow_umask(work)
        if target.exists():
            retired = work.with_name(f"{work.name}.replaced")
            os.replace(target, retired)
            os.replace(work, target)
            shutil.rmtree(retired)
        else:
            os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` all at once: a reader sees the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
