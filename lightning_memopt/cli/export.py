"""``memopt export``: write a checkpoint's model as a folder plain ``transformers`` loads (or int8, sparse, shrunk)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from lightning_memopt.core.checkpoints import read_checkpoint
from lightning_memopt.core.sources import resolve_pretrained
from lightning_memopt.pruning.sparse_format import save_sparse
from lightning_memopt.pruning.structured import shrink_pruned
from lightning_memopt.quantization.export import checkpoint_qat_state, convert_with_qat_state, save_int8
from lightning_memopt.tasks.modules import load_task_checkpoint


def export_command(argv: Sequence[str]) -> None:
    """``memopt export``: write a checkpoint's model as a folder plain ``transformers`` loads."""
    parser = ArgumentParser(prog="memopt export", description=export_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="A checkpoint written by `memopt fit`.")
    parser.add_argument("--output_dir", required=True, help="Folder to write (created if missing).")
    parser.add_argument(
        "--sparse",
        type=bool,
        default=False,
        help="Also write model.sparse.safetensors: pruned weights as non-zero values plus a 1-bit mask.",
    )
    parser.add_argument(
        "--shrink",
        type=bool,
        default=False,
        help="Cut structurally pruned feed-forward neurons out of the model (smaller, faster, loads with plain "
        "transformers); pruned attention heads stay as zeros (remove them after loading with "
        "lightning_memopt.pruning.shrink_pruned(model, heads=True)).",
    )
    parser.add_argument(
        "--int8",
        type=bool,
        default=False,
        help="Write an int8 model (model.int8.safetensors, read with lightning_memopt.quantization.load_int8) instead "
        "of a float one: the layers and weight scales of a QuantizationAwareTraining run, or post-training dynamic "
        "quantization of the encoder's Linear layers for a run without QAT.",
    )
    args = parser.parse_args(list(argv))
    module = load_task_checkpoint(args.ckpt_path)
    if args.int8:
        export_int8(module, args.ckpt_path, args.output_dir)
        return
    if args.shrink:
        report = shrink_pruned(module.model)
        print(
            f"Shrunk: {report.neurons_kept} feed-forward neurons per block kept; parameters "
            f"{report.params_before:,} -> {report.params_after:,} ({report.params_after / report.params_before:.1%})."
        )
    folder = module.export_pretrained(args.output_dir)
    print(f"Exported {type(module).__name__} with labels {module.labels} to {folder}")
    if args.sparse:
        report = save_sparse(module.model.state_dict(), folder / "model.sparse.safetensors")
        print(
            f"Sparse copy: {report.file_bytes / 2**20:.1f} MiB for {report.dense_bytes / 2**20:.1f} MiB of dense tensors "
            f"({report.ratio:.1%}); {len(report.packed)} pruned tensors packed. Read it with "
            "lightning_memopt.pruning.load_sparse."
        )


def export_int8(module: Any, ckpt_path: str, output_dir: str) -> None:
    """The ``--int8`` branch of ``memopt export``."""

    state = checkpoint_qat_state(read_checkpoint(ckpt_path, tensors=False))
    names = convert_with_qat_state(module.model, state)
    if state is None:
        how = "post-training dynamic quantization (no QAT state in the checkpoint)"
    else:
        how = f"QAT layers{' with frozen weight scales' if state['frozen_scales'] else ''}"
    report = save_int8(module.model, output_dir, resolve_pretrained(module.model_name_or_path))
    print(
        f"Exported int8 {type(module.model).__name__} to {output_dir}: {len(names)} Linear layers from {how}; "
        f"their weights take {report.int8_weight_bytes / 2**20:.1f} MiB for {report.fp32_weight_bytes / 2**20:.1f} "
        f"MiB in float32 ({report.ratio:.1%}). Load with lightning_memopt.quantization.load_int8."
    )
