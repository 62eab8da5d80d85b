"""Read a Lightning checkpoint as one dict: a single file, or the sharded folder FSDP1/2 or DeepSpeed writes.

``ModelParallelStrategy`` (and our ``FSDP2Strategy``) save checkpoints as folders: the tensors in
``torch.distributed.checkpoint`` shards, the rest of the state in ``meta.pt``. Exporting, distilling
from or inspecting such a checkpoint needs the full tensors, which torch's ``dcp_to_torch_save``
gathers in a single process. DeepSpeed (``ZeROStrategy``) writes a folder with a ``latest`` file
naming a tag folder of per-rank files; ZeRO-3 parameters are put back together from the per-rank
float32 partitions of its optimizer files. Everything is read with ``weights_only=True`` (DeepSpeed's
loss-scaler and stage classes are allowed by name, nothing else).

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
DEEPSPEED_LATEST = "latest"
# DeepSpeed's own entries in its model-state files; the rest is Lightning's checkpoint.
DEEPSPEED_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
}  # fmt: skip


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", tensors: bool = True) -> dict[str, Any]:
    """The checkpoint as Lightning's dict; ``tensors=False`` skips gathering a sharded folder's ``state_dict``."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location=map_location, weights_only=True, mmap=not tensors)
    if (path / DEEPSPEED_LATEST).exists():
        return read_deepspeed_checkpoint(path, map_location, tensors)
    if not (path / META_FILE).exists():
        raise ValueError(
            f"{path} is a folder without {META_FILE} or {DEEPSPEED_LATEST}: not a sharded FSDP2 or DeepSpeed checkpoint."
        )
    checkpoint = torch.load(path / META_FILE, map_location=map_location, weights_only=True)
    if tensors:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as folder:
            dcp_to_torch_save(path, Path(folder) / "gathered.pt")
            gathered = torch.load(Path(folder) / "gathered.pt", map_location=map_location, weights_only=True)
        # ModelParallelStrategy (FSDP2) stores the module under "state_dict", FSDPStrategy (FSDP1) under "model".
        checkpoint["state_dict"] = gathered["state_dict"] if "state_dict" in gathered else gathered["model"]
    return checkpoint


def _load_deepspeed_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
        return torch.load(path, map_location=map_location, weights_only=True)


def read_deepspeed_checkpoint(path: Path, map_location: str | torch.device = "cpu", tensors: bool = True) -> dict:
    """A DeepSpeed checkpoint folder as Lightning's dict, with the full ``state_dict`` unless ``tensors=False``.

    ZeRO 1 and 2 keep whole parameters in the model-state file (in the training dtype); ZeRO-3 keeps a
    float32 slice of each parameter per rank, padded to equal size, in the optimizer files.
    """
    folder = path / (path / DEEPSPEED_LATEST).read_text().strip()
    model_files = sorted(folder.glob("*model_states.pt"))
    if not model_files:
        raise ValueError(f"{folder} holds no DeepSpeed *model_states.pt file.")
    client = _load_deepspeed_file(model_files[0], map_location)
    checkpoint = {key: value for key, value in client.items() if key not in DEEPSPEED_KEYS}
    if not tensors:
        return checkpoint
    module = client["module"]
    if all(t.numel() > 0 for t in module.values()):  # ZeRO 1/2: whole tensors
        checkpoint["state_dict"] = dict(module)
        return checkpoint
    shapes = {name: shape for group in client["param_shapes"] for name, shape in group.items()}
    ranks = [
        torch.cat(_load_deepspeed_file(f, map_location)["optimizer_state_dict"]["fp32_flat_groups"])
        for f in sorted(folder.glob("*optim_states.pt"), key=lambda f: int(f.name.split("_")[3]))  # zero_pp_rank_R_...
    ]
    state_dict, offset = {}, 0
    for name, shape in shapes.items():
        numel = shape.numel()
        part = -(-numel // len(ranks))  # each rank's slice, the last one padded
        whole = torch.cat([flat.narrow(0, offset, part) for flat in ranks])
        state_dict[name] = whole[:numel].view(shape)
        offset += part
    buffers = {name: module[name] for name in client.get("buffer_names", []) if name in module}
    checkpoint["state_dict"] = {**state_dict, **buffers}
    return checkpoint
