"""AtomicCheckpointIO: a failed save leaves the previous checkpoint intact and no partial file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_memopt import AtomicCheckpointIO
from lightning_memopt.core import atomic_io as module


def test_save_and_load(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "sub" / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "last.ckpt", weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "sub" / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open()


def test_loads_refuse_pickled_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    torch.save({"evil": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


def test_interrupted_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def crash(obj, stream) -> None:
        stream.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the run is killed mid-write

    monkeypatch.setattr(module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_partial_files_of_dead_writers_are_removed_at_the_next_save(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".last.ckpt.{int(dead.stdout)}.abc123{module.PARTIAL_SUFFIX}"
    legacy = tmp_path / f".last.ckpt.k2j4h5{module.PARTIAL_SUFFIX}"  # written before the pid was in the name
    live = tmp_path / f".last.ckpt.{os.getpid()}.zz9{module.PARTIAL_SUFFIX}"  # a save in progress elsewhere
    for path in (orphan, legacy, live):
        path.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live.name])
