"""Read a Lightning checkpoint as one dict: a single file, or the sharded folder FSDP2 writes.

``ModelParallelStrategy`` (and our ``FSDP2Strategy``) save checkpoints as folders: the tensors in
``torch.distributed.checkpoint`` shards, the rest of the state in ``meta.pt``. Exporting, distilling
from or inspecting such a checkpoint needs the full tensors, which torch's ``dcp_to_torch_save``
gathers in a single process. Everything is read with ``weights_only=True``.

Example:
    >>> read_checkpoint("runs/ner-conll2003/checkpoints/last.ckpt")["global_step"]  # doctest: +SKIP
    600
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.pt"


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", tensors: bool = True) -> dict[str, Any]:
    """The checkpoint as Lightning's dict; ``tensors=False`` skips gathering a sharded folder's ``state_dict``."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location=map_location, weights_only=True, mmap=not tensors)
    if not (path / META_FILE).exists():
        raise ValueError(f"{path} is a folder without {META_FILE}: not a sharded Lightning checkpoint.")
    checkpoint = torch.load(path / META_FILE, map_location=map_location, weights_only=True)
    if tensors:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as folder:
            dcp_to_torch_save(path, Path(folder) / "gathered.pt")
            gathered = torch.load(Path(folder) / "gathered.pt", map_location=map_location, weights_only=True)
        checkpoint["state_dict"] = gathered["state_dict"]
    return checkpoint
