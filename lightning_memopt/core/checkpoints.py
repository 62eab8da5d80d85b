"""Read checkpoints without running anything found in them: single files, and the folders of sharded strategies.

A Lightning checkpoint is a ``torch.save`` pickle; the sharded strategies write folders instead:

- FSDP1 / FSDP2 (``FSDPStrategy``, ``ModelParallelStrategy`` and our presets): tensors in
  ``torch.distributed.checkpoint`` (DCP) shards, the rest of the state in ``meta.pt``;
- DeepSpeed (``ZeROStrategy``): a ``latest`` file naming a tag folder of per-rank ``*.pt`` files.

Every pickle is read with ``weights_only=True`` (tensors, containers and plain values only), except two
that torch itself reads with plain ``pickle``: DCP's ``.metadata`` file and the non-tensor entries of DCP
shards. Here the first goes through :class:`MetadataUnpickler`, which admits only the classes torch
writes there, and the second through ``weights_only=True``. A file that asks for anything else raises
:class:`UnsafeCheckpointError` before any of it runs.

:func:`verify_checkpoint` checks a checkpoint the same way without reading its tensors, for code that
then hands it to a loader we do not control (Lightning's resume, DeepSpeed's ``load_checkpoint``).

Example:
    >>> read_checkpoint("runs/ner-conll2003/checkpoints/last.ckpt")["global_step"]  # doctest: +SKIP
    600
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch

from lightning_memopt.core.compat import dcp_gathering_planner_class, dcp_storage_info_class, load_dcp_state

META_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"
DEEPSPEED_LATEST = "latest"
# DeepSpeed's own entries in its model-state files; the rest is Lightning's checkpoint.
DEEPSPEED_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
}  # fmt: skip


# The classes torch.distributed.checkpoint pickles into its .metadata file.
DCP_METADATA_CLASSES = (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
)  # fmt: skip


class UnsafeCheckpointError(ValueError):
    """A checkpoint asked to run or import something that a plain checkpoint never contains."""


def _refuse(path: str | Path, error: Exception) -> UnsafeCheckpointError:
    reason = str(error)
    if "Unsupported global:" in reason:  # torch's weights-only refusal: keep its one informative sentence
        reason = reason.split("Unsupported global:")[1].split(" was not an allowed global")[0].strip()
        reason = f"it asks for {reason.removeprefix('GLOBAL ')}"
    return UnsafeCheckpointError(
        f"Refused to load {path}: not a plain checkpoint ({reason}). Nothing from it was run. Load only "
        "checkpoints you or a trusted tool wrote; see docs/security.md."
    )


def _dcp_metadata_classes() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import metadata

    admitted: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name) for name in DCP_METADATA_CLASSES if hasattr(metadata, name)
    }
    storage_info = dcp_storage_info_class()
    admitted[(storage_info.__module__, storage_info.__name__)] = storage_info
    admitted[("torch", "Size")] = torch.Size
    admitted[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    admitted[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for cls in (Path, PurePath, type(Path()), type(PurePath())):  # StorageMeta.checkpoint_id
        admitted[(cls.__module__, cls.__name__)] = cls
    return admitted


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its own dataclasses, ``torch.Size``, dtypes, layouts, paths; nothing else."""

    admitted: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if MetadataUnpickler.admitted is None:
            MetadataUnpickler.admitted = _dcp_metadata_classes()
        if (module, name) in MetadataUnpickler.admitted:
            return MetadataUnpickler.admitted[(module, name)]
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"its {DCP_METADATA_FILE} names {module}.{name}, which checkpoint metadata never holds"
        )


def read_dcp_metadata(folder: str | Path) -> Any:
    """A DCP folder's ``.metadata`` through :class:`MetadataUnpickler`, its storage paths checked to stay inside."""
    folder = Path(folder)
    try:
        with open(folder / DCP_METADATA_FILE, "rb") as stream:
            metadata = MetadataUnpickler(stream).load()
    except FileNotFoundError:
        raise ValueError(
            f"{folder} has no {DCP_METADATA_FILE} file: not a torch.distributed.checkpoint folder."
        ) from None
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError, ImportError) as error:
        raise _refuse(folder, error) from None
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        relative = PurePath(str(getattr(info, "relative_path", "")))
        if relative.is_absolute() or ".." in relative.parts:
            raise _refuse(folder, ValueError(f"a shard path {str(relative)!r} points outside the folder"))
    return metadata


def _safe_dcp_reader_and_planner(folder: Path, keys: set[str] | None = None) -> tuple[Any, Any]:
    """torch's DCP reader and gathering planner, with :func:`read_dcp_metadata` and weights-only non-tensor entries."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = read_dcp_metadata(folder)  # before torch's loader, which would wrap our error in its own

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(dcp_gathering_planner_class()):  # type: ignore[misc]
        refusal: UnsafeCheckpointError | None = None

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:  # torch's own uses weights_only=False
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                self.refusal = _refuse(folder, error)
                raise self.refusal from None
            super().load_bytes(read_item, _saved(loaded))

    return SafeReader(folder), SafePlanner(keys=keys)


def _saved(value: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def _bytes_keys(metadata: Any) -> set[str]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    return {key for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)}


def read_dcp(folder: str | Path, keys: set[str] | None = None) -> dict[str, Any]:
    """The state a DCP folder holds, gathered in this process (all of it, or the flattened ``keys``)."""
    folder = Path(folder)
    reader, planner = _safe_dcp_reader_and_planner(folder, keys)
    state: dict[str, Any] = {}
    try:
        load_dcp_state(state, reader, planner)
    except BaseException:  # torch's CheckpointException derives from BaseException
        if planner.refusal is not None:  # torch wraps what the planner raised
            raise planner.refusal from None
        raise
    return state


def _load_file(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _refuse(path, error) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError) as error:  # torch's zip reader (or mmap) on a truncated or damaged file
        raise ValueError(f"{path} is not a readable checkpoint: it is truncated or damaged ({error}).") from None


def _deepspeed_classes() -> list[Any]:
    """The few DeepSpeed classes its checkpoint files hold (loss scaler, stage enum, fragment addresses)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


def _deepspeed_tag_folder(path: Path) -> Path:
    tag = (path / DEEPSPEED_LATEST).read_text().strip()
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise _refuse(path, ValueError(f"its {DEEPSPEED_LATEST} file names {tag!r}, not a tag folder inside it"))
    return path / tag


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` unless every pickle a loader would read from ``path`` is plain data.

    Reads the pickles but not the tensors (memory-mapped files, DCP's non-tensor entries only), so it
    is cheap enough to run before every resume.
    """
    path = Path(path)
    if not path.is_dir():
        _load_file(path, mmap=True)
    elif (path / DEEPSPEED_LATEST).exists():
        for file in sorted(_deepspeed_tag_folder(path).glob("*.pt")):
            _load_file(file, mmap=True)
    elif (path / DCP_METADATA_FILE).exists():
        byte_entries = _bytes_keys(read_dcp_metadata(path))
        if byte_entries:
            read_dcp(path, keys=byte_entries)
        if (path / META_FILE).exists():
            _load_file(path / META_FILE, mmap=True)
    else:
        raise ValueError(
            f"{path} is a folder without {DCP_METADATA_FILE} or {DEEPSPEED_LATEST}: not a checkpoint file, nor the "
            "sharded checkpoint folder of FSDP or DeepSpeed."
        )


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", tensors: bool = True) -> dict[str, Any]:
    """The checkpoint as Lightning's dict; ``tensors=False`` skips gathering a sharded folder's ``state_dict``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if not path.is_dir():
        return _load_file(path, map_location, mmap=not tensors)
    if (path / DEEPSPEED_LATEST).exists():
        return read_deepspeed_checkpoint(path, map_location, tensors)
    if not (path / META_FILE).exists():
        raise ValueError(
            f"{path} is a folder without {META_FILE} or {DEEPSPEED_LATEST}: not a sharded FSDP2 or DeepSpeed checkpoint."
        )
    checkpoint = _load_file(path / META_FILE, map_location)
    if tensors:
        gathered = read_dcp(path)
        # ModelParallelStrategy (FSDP2) stores the module under "state_dict", FSDPStrategy (FSDP1) under "model".
        state = gathered["state_dict"] if "state_dict" in gathered else gathered["model"]
        checkpoint["state_dict"] = {name: tensor.to(map_location) for name, tensor in state.items()}
    return checkpoint


def read_deepspeed_checkpoint(path: Path, map_location: str | torch.device = "cpu", tensors: bool = True) -> dict:
    """A DeepSpeed checkpoint folder as Lightning's dict, with the full ``state_dict`` unless ``tensors=False``.

    ZeRO 1 and 2 keep whole parameters in the model-state file (in the training dtype); ZeRO-3 keeps a
    float32 slice of each parameter per rank, padded to equal size, in the optimizer files.
    """
    folder = _deepspeed_tag_folder(path)
    model_files = sorted(folder.glob("*model_states.pt"))
    if not model_files:
        raise ValueError(f"{folder} holds no DeepSpeed *model_states.pt file.")
    client = _load_file(model_files[0], map_location)
    checkpoint = {key: value for key, value in client.items() if key not in DEEPSPEED_KEYS}
    if not tensors:
        return checkpoint
    module = client["module"]
    if all(t.numel() > 0 for t in module.values()):  # ZeRO 1/2: whole tensors
        checkpoint["state_dict"] = dict(module)
        return checkpoint
    shapes = {name: shape for group in client["param_shapes"] for name, shape in group.items()}
    ranks = [
        torch.cat(_load_file(f, map_location)["optimizer_state_dict"]["fp32_flat_groups"])
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
