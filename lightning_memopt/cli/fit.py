"""``memopt fit`` / ``validate`` / ``test`` / ``predict``: LightningCLI for any LightningModule and DataModule.

Besides Lightning's own options it has two optional checkpoint sections, ``checkpoint`` (the best
model by a validation metric) and ``last_checkpoint`` (a resumable ``last.ckpt`` every N steps), so
that recipes configure checkpointing apart from ``trainer.callbacks``, which compression overlays
extend with ``callbacks+:``. The run-end callbacks of :mod:`lightning_memopt.callbacks` are added to
every Trainer it builds, and ``--ckpt_path`` is checked to hold nothing but data before it is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_memopt.callbacks import FinalLastCheckpoint, MetricsSummary, ValidateFinalStep
from lightning_memopt.core.checkpoints import read_checkpoint, verify_checkpoint
from lightning_memopt.core.compat import last_checkpoints
from lightning_memopt.core.run_lock import RunLock, release_all
from lightning_memopt.core.sources import resolve_pretrained
from lightning_memopt.tasks.data import AUTO_LABELS, SequenceClassificationDataModule, TokenClassificationDataModule
from lightning_memopt.tasks.modules import TASK_CLASSES, TASK_KEY

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
RUN_END_CALLBACKS = (ValidateFinalStep, FinalLastCheckpoint, MetricsSummary)
DATA_CLASSES = {cls.__name__: cls for cls in (TokenClassificationDataModule, SequenceClassificationDataModule)}
NAMED_CHECKPOINTS = (None, "best", "hpc", "last", "auto")
RESUME_IF_PRESENT = "auto"  # --ckpt_path auto: resume from last.ckpt when there is one, else start fresh
IDENTITY = ("model_name_or_path", "labels", "num_labels")  # what a checkpoint and the config must agree on


def launched_as_rank_zero() -> bool:
    """Whether this process is the job's first (the launcher's own, or global rank 0 of torchrun/SLURM)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _same_model(given: Any, saved: Any) -> bool:
    if given == saved:
        return True
    try:
        return Path(resolve_pretrained(str(given))).resolve() == Path(resolve_pretrained(str(saved))).resolve()
    except (OSError, ValueError):
        return False


def check_checkpoint_matches(model_config: Any, checkpoint: dict[str, Any], path: str) -> None:
    """The checkpoint's task class, model and labels equal what the config asks for, or an error naming both."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    given_class = str(getattr(model_config, "class_path", "") or "").rsplit(".", 1)[-1]
    saved_class = checkpoint.get(TASK_KEY) or str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
    if given_class and saved_class and given_class != saved_class:
        raise ValueError(
            f"--ckpt_path {path} is a checkpoint of {saved_class}, but --model is {given_class}; use the task the "
            "checkpoint was trained for, or train a new model without --ckpt_path."
        )
    init_args = getattr(model_config, "init_args", None) or {}
    for key in IDENTITY:
        given, stored = init_args.get(key) if hasattr(init_args, "get") else None, saved.get(key)
        if given in (None, AUTO_LABELS) or stored is None:
            continue
        same = (
            _same_model(given, stored)
            if key == "model_name_or_path"
            else list(map(str, _listed(given))) == list(map(str, _listed(stored)))
        )
        if not same:
            raise ValueError(
                f"--model.{key}={given!r} contradicts the checkpoint {path}, which was trained with {stored!r}; "
                f"drop --model.{key} (the checkpoint's is used) or start a new run without --ckpt_path."
            )


RUN_PATHS = (
    "trainer.default_root_dir",
    "trainer.logger.init_args.save_dir",
    "checkpoint.init_args.dirpath",
    "last_checkpoint.init_args.dirpath",
)
RUN_NAME = "{run_name}"


def default_run_name(train_file: str | None) -> str:
    """The training file's folder name (its stem when it lies in the current folder).

    >>> default_run_name("data/wnut17/train.conll"), default_run_name("train.tsv.gz"), default_run_name(None)
    ('wnut17', 'train', 'run')
    """
    if not train_file:
        return "run"
    path = Path(train_file)
    return path.parent.name if path.parent.name not in ("", ".") else path.name.split(".")[0]


def name_run_folders(config: Any) -> None:
    """Put ``{run_name}`` (or, with ``--run_name``, the folder after ``runs/``) into the run's paths."""
    given = config.get("run_name")
    data = getattr(config.get("data"), "init_args", None)
    name = given or default_run_name(getattr(data, "train_file", None) if data is not None else None)
    for key in RUN_PATHS:
        try:
            value = config.get(key)
        except (KeyError, AttributeError):
            continue
        if not isinstance(value, str):
            continue
        if RUN_NAME in value:
            config[key] = value.replace(RUN_NAME, name)
        elif given and value.startswith("runs/"):
            parts = value.split("/")
            config[key] = "/".join(["runs", given, *parts[2:]])


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class MemoptCLI(LightningCLI):
    """LightningCLI that takes any LightningModule / LightningDataModule and reports final metrics."""

    locks: list[RunLock]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("checkpoint", "last_checkpoint"):
            parser.add_lightning_class_args(ModelCheckpoint, key, subclass_mode=True, required=False)
        parser.add_argument(
            "--run_name",
            default=None,
            help="Name of this run's folder under runs/: replaces {run_name} in the recipe's paths (default: the "
            "training file's folder), or the folder after runs/ in recipes without it.",
        )

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        name_run_folders(config)
        self._infer_labels(config)

    def _infer_labels(self, config: Any) -> None:
        """``--model.labels auto`` (or none given): the label list of the training data, printed and saved."""
        model, data = config.get("model"), config.get("data")
        init_args = getattr(model, "init_args", None)
        if init_args is None or init_args.get("labels") not in (None, AUTO_LABELS) or data is None:
            return
        data_class = DATA_CLASSES.get(str(getattr(data, "class_path", "")).rsplit(".", 1)[-1])
        if data_class is None or str(getattr(model, "class_path", "")).rsplit(".", 1)[-1] not in TASK_CLASSES:
            return
        labels = data_class(**{**vars(data.init_args), "labels": None}).infer_labels()
        print(f"Labels inferred from the data ({len(labels)}): {labels}", flush=True)
        init_args.labels = labels

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
        present = {type(callback) for callback in trainer.callbacks}
        trainer.callbacks += [kind() for kind in RUN_END_CALLBACKS if kind not in present]
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check an explicit ``--ckpt_path`` before Lightning reads its hyper-parameters into the config."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path not in NAMED_CHECKPOINTS and "://" not in str(path) and not str(path).startswith("registry:"):
            if not Path(path).exists():
                raise FileNotFoundError(f"--ckpt_path {path}: no such file or folder.")
            verify_checkpoint(path)
            checkpoint = read_checkpoint(path, tensors=False)
            check_checkpoint_matches(self.config[subcommand].get("model"), checkpoint, path)
            self._from_cli = "_class_path" in (checkpoint.get("hyper_parameters") or {})

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own merge of a checkpoint's hyper-parameters into the config (a private hook).

        Only checkpoints written through a CLI name their class, which that merge needs; for others (written
        from Python) the config stays as given, its model, task and labels checked against them above.
        """
        if getattr(self, "_from_cli", True):
            super()._parse_ckpt_path()

    def before_fit(self) -> None:
        self._verify_ckpt_path()
        self.locks = []
        if launched_as_rank_zero():
            folders = {Path(c.dirpath or self.trainer.default_root_dir) for c in self.trainer.checkpoint_callbacks}
            for folder in sorted(folders or {Path(self.trainer.default_root_dir)}):
                lock = RunLock(folder)
                lock.acquire()
                self.locks.append(lock)

    def after_fit(self) -> None:
        for lock in getattr(self, "locks", []):
            lock.release()

    def before_validate(self) -> None:
        self._verify_ckpt_path()

    def before_test(self) -> None:
        self._verify_ckpt_path()

    def before_predict(self) -> None:
        self._verify_ckpt_path()

    def _verify_ckpt_path(self) -> None:
        """Resolve and check ``--ckpt_path last`` / ``auto`` before Lightning or DeepSpeed read the checkpoint.

        An explicit path was checked when it was parsed (:meth:`parse_arguments`); ``best``, ``hpc`` and
        ``registry:`` name no file of this run's folders.
        """
        options = self.config_init[self.subcommand]
        given = options.get("ckpt_path")
        if given not in ("last", RESUME_IF_PRESENT):
            return
        found = sorted(last_checkpoints(self.trainer))
        if given == RESUME_IF_PRESENT:
            options["ckpt_path"] = "last" if found else None
        elif not found:
            folders = sorted({str(c.dirpath) for c in self.trainer.checkpoint_callbacks if c.dirpath})
            raise FileNotFoundError(
                f"--ckpt_path last: there is no last checkpoint in {', '.join(folders) or 'the checkpoint folders'}. "
                f"Drop --ckpt_path to start a new run, or pass --ckpt_path {RESUME_IF_PRESENT} to resume when there is one."
            )
        for path in found:
            if "://" not in str(path):  # remote: AtomicCheckpointIO loads it weights-only
                verify_checkpoint(path)


def run_cli(args: list[str] | None = None, **cli_kwargs: Any) -> MemoptCLI:
    """Run the LightningCLI part of ``memopt`` (``fit``, ``validate``, ``test``, ``predict``).

    Extra keyword arguments go to :class:`LightningCLI` (e.g. ``trainer_defaults={"callbacks": [...]}``).
    """
    try:
        return MemoptCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION, "exit_on_error": False},
            args=args,
            **cli_kwargs,
        )
    finally:
        release_all()  # the run folder locks of this command, however it ended
