"""``KnowledgeDistillation``: train any LightningModule against a frozen teacher, without edits to the module.

How it reaches into a module that knows nothing of it:

1. A forward hook on the student's model (by default the first Hugging Face model with a task head
   inside the LightningModule, else the LightningModule itself) keeps the logits of the last forward.
2. The module's ``training_step`` is wrapped on the instance: the original runs unchanged and returns
   its own loss ``L`` (for our task modules: cross entropy); the wrapper runs the teacher on the same
   batch and returns ``(1 - alpha) * L + alpha * T² * KL(teacher ‖ student)``, logging ``train_ce``
   (= ``L``) and ``train_kd`` apart. ``validation_step`` is wrapped the same way to log ``val_kd`` and
   ``val_agreement`` (how often student and teacher pick the same class) next to the module's own
   metrics; when fit ends, the student's monitored metrics are printed beside the teacher's (as its
   checkpoint recorded them). The wrappers are removed when fit ends.

For token classification only positions with a label count (``labels != -100``). Batches that are not
dicts of model inputs need ``batch_to_teacher_inputs`` (and ``batch_to_labels`` for token tasks);
outputs without ``.logits`` need ``outputs_to_logits``.

The teacher is kept on the callback, not on the module: it is outside the optimizer, outside the
module's checkpoint and outside DDP/FSDP2 wrapping (each rank holds a full replica), frozen and in eval
mode, on the student's device, optionally in lower precision.

Example:
    >>> kd = KnowledgeDistillation(teacher="runs/ner-conll2003/checkpoints/last.ckpt", alpha=0.5)  # doctest: +SKIP
    >>> trainer = Trainer(callbacks=[kd])  # doctest: +SKIP
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_memopt.distillation.losses import IGNORE_INDEX, check_alpha_temperature, soft_target_kl
from lightning_memopt.distillation.teacher import Teacher, check_teacher_source, freeze, load_teacher

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
PROBE_TEXT = "Distillation probe: EU rejects German call to boycott British lamb, says Müller (1996)."
DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")


def default_teacher_inputs(batch: Any) -> dict[str, Tensor]:
    """The model-input fields of a dict batch (``input_ids``, ``attention_mask``, ``token_type_ids``)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"KnowledgeDistillation got a {type(batch).__name__} batch; pass batch_to_teacher_inputs, a callable "
            "mapping your batch to the teacher's keyword arguments (e.g. lambda b: {'input_ids': b[0], ...})."
        )
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}


def default_labels(batch: Any) -> Tensor | None:
    """``batch["labels"]`` for dict batches, else ``None`` (every position counts)."""
    return batch.get("labels") if isinstance(batch, Mapping) else None


def default_logits(output: Any) -> Tensor:
    """``output.logits``, or the output itself if it is a tensor, or its first element."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Cannot find logits in a {type(output).__name__}; pass outputs_to_logits.")


def find_student_model(pl_module: LightningModule) -> tuple[str, nn.Module]:
    """The first Hugging Face model with a task head inside ``pl_module``, else ``pl_module`` itself."""
    from transformers import PreTrainedModel

    for name, module in pl_module.named_modules():
        if isinstance(module, PreTrainedModel) and "For" in type(module).__name__:
            return name, module
    return "", pl_module


def _label_names(config: Any) -> list[str] | None:
    """Label names from a HF config, or ``None`` when they are the generated ``LABEL_i`` defaults."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return None if all(name == f"LABEL_{i}" for i, name in enumerate(names)) else names


class KnowledgeDistillation(Callback):
    """Add a soft-target distillation loss from a frozen teacher to any LightningModule's training loss.

    Args:
        teacher: a ``.ckpt`` of our task modules, a model folder, a hub name, ``pypi:DIST``, or an ``nn.Module``.
        alpha: weight of the distillation term, in [0, 1]; the module's own loss gets ``1 - alpha``.
        temperature: softmax temperature T > 0; the KL term is scaled by T².
        teacher_precision: ``"32"``, ``"bf16"`` or ``"16"`` to cast the teacher; ``None`` keeps its dtype.
        student_module: name of the submodule whose output holds the student's logits (``""`` for the
            LightningModule itself); ``None`` finds the first Hugging Face model with a task head.
        student_tokenizer: tokenizer to compare with the teacher's on a probe text; ``None`` uses the
            datamodule's ``tokenizer`` or the module's ``model_name_or_path`` when present.
        batch_to_teacher_inputs: maps a batch to the teacher's keyword arguments; ``None``:
            :func:`default_teacher_inputs` (the model-input keys of a dict batch).
        batch_to_labels: maps a batch to labels with ``-100`` at ignored positions, or ``None``;
            ``None``: :func:`default_labels` (``batch["labels"]``).
        outputs_to_logits: maps the student's and the teacher's outputs to logits; ``None``:
            :func:`default_logits` (``.logits``, a tensor, or the first element).
    """

    def __init__(
        self,
        teacher: str | nn.Module,
        alpha: float = 0.5,
        temperature: float = 2.0,
        teacher_precision: Literal["32", "bf16", "16"] | None = None,
        student_module: str | None = None,
        student_tokenizer: str | None = None,
        batch_to_teacher_inputs: Callable[[Any], dict[str, Tensor]] | None = None,
        batch_to_labels: Callable[[Any], Tensor | None] | None = None,
        outputs_to_logits: Callable[[Any], Tensor] | None = None,
    ) -> None:
        check_alpha_temperature(alpha, temperature)
        check_teacher_source(teacher)
        if teacher_precision is not None and teacher_precision not in DTYPES:
            raise ValueError(f"teacher_precision must be one of {sorted(DTYPES)} or None, got {teacher_precision!r}.")
        self.source = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.teacher_precision = teacher_precision
        self.student_module = student_module
        self.student_tokenizer = student_tokenizer
        self.batch_to_teacher_inputs = batch_to_teacher_inputs or default_teacher_inputs
        self.batch_to_labels = batch_to_labels or default_labels
        self.outputs_to_logits = outputs_to_logits or default_logits
        self.teacher: nn.Module | None = None
        self._student_logits: Tensor | None = None
        self._hook: Any = None
        self._teacher_info: Teacher | None = None

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if any(base.__name__ in UNSUPPORTED_STRATEGIES for base in type(trainer.strategy).__mro__):
            raise ValueError(
                f"KnowledgeDistillation does not support {name} yet: its sharding would have to leave the teacher "
                "out of the student's wrapping. Use --trainer.strategy ddp, or ModelParallelStrategy (FSDP2)."
            )
        if self._teacher_info is None:
            self._teacher_info = load_teacher(self.source)
        dtype = DTYPES[self.teacher_precision] if self.teacher_precision else None
        self.teacher = freeze(self._teacher_info.model, dtype)
        _, student = self._student(pl_module)
        self._check_labels(pl_module, student)
        self._check_vocabulary(student)
        self._check_tokenizers(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.teacher is not None
        self.teacher.to(pl_module.device)
        name, student = self._student(pl_module)
        self._hook = student.register_forward_hook(self._keep_logits)
        training, validation = pl_module.training_step, pl_module.validation_step
        callback = self

        def training_step(module: LightningModule, batch: Any, *args: Any, **kwargs: Any) -> Any:
            callback._student_logits = None
            output = training(batch, *args, **kwargs)
            return callback._add_distillation(module, batch, output)

        def validation_step(module: LightningModule, batch: Any, *args: Any, **kwargs: Any) -> Any:
            callback._student_logits = None
            output = validation(batch, *args, **kwargs)
            callback._log_validation(module, batch)
            return output

        pl_module.training_step = types.MethodType(training_step, pl_module)  # type: ignore[method-assign]
        pl_module.validation_step = types.MethodType(validation_step, pl_module)  # type: ignore[method-assign]
        rank_zero_info(
            f"KnowledgeDistillation: teacher {type(self.teacher).__name__} "
            f"({sum(p.numel() for p in self.teacher.parameters()):,} parameters, frozen) on the logits of "
            f"{name or type(pl_module).__name__}; alpha {self.alpha}, temperature {self.temperature}."
        )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")
        rank_zero_info(self.summary(trainer))

    def summary(self, trainer: Trainer) -> str:
        """Student and teacher validation scores side by side (teacher: as its checkpoint recorded them)."""
        teacher_scores = self._teacher_info.scores if self._teacher_info else {}
        lines = ["KnowledgeDistillation: metric  student  teacher  retention"]
        names = sorted(set(teacher_scores) | {k for k in ("val_kd", "val_agreement") if k in trainer.callback_metrics})
        for name in names:
            student = trainer.callback_metrics.get(name)
            teacher = teacher_scores.get(name)
            retention = f"{float(student) / teacher:.1%}" if student is not None and teacher else "-"
            shown = [f"{float(v):.4f}" if v is not None else "-" for v in (student, teacher)]
            lines.append(f"  {name}  {shown[0]}  {shown[1]}  {retention}")
        return "\n".join(lines)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for name in ("training_step", "validation_step"):
            pl_module.__dict__.pop(name, None)  # back to the class's own methods

    # -- the work ----------------------------------------------------------------------------
    def _student(self, pl_module: LightningModule) -> tuple[str, nn.Module]:
        if self.student_module is None:
            return find_student_model(pl_module)
        try:
            return self.student_module, pl_module.get_submodule(self.student_module)
        except AttributeError:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"student_module={self.student_module!r} is not a submodule of {type(pl_module).__name__}; "
                f"its children are {names}."
            ) from None

    def _keep_logits(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._student_logits = self.outputs_to_logits(output)

    def _teacher_logits_and_mask(self, batch: Any, student_logits: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self.teacher is not None
        with torch.no_grad():
            teacher_logits = self.outputs_to_logits(self.teacher(**self.batch_to_teacher_inputs(batch)))
        labels = self.batch_to_labels(batch)
        mask = labels != IGNORE_INDEX if student_logits.dim() == 3 and labels is not None else None
        return teacher_logits.to(student_logits.dtype), mask

    def _log_validation(self, pl_module: LightningModule, batch: Any) -> None:
        student_logits = self._student_logits
        if student_logits is None:
            return  # a validation step without a forward through the student: nothing to compare
        teacher_logits, mask = self._teacher_logits_and_mask(batch, student_logits)
        kd = soft_target_kl(student_logits, teacher_logits, self.temperature, mask)
        same = student_logits.argmax(-1) == teacher_logits.argmax(-1)
        agreement = (same[mask] if mask is not None else same).float().mean()
        options = {"batch_size": student_logits.shape[0], "sync_dist": True}
        pl_module.log("val_kd", kd, **options)
        pl_module.log("val_agreement", agreement, **options)
        self._student_logits = None

    def _add_distillation(self, pl_module: LightningModule, batch: Any, output: Any) -> Any:
        loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor) or self._student_logits is None:
            raise RuntimeError(
                "KnowledgeDistillation found no student loss or logits in this training step: training_step must "
                "return the loss (or a dict with 'loss') after a forward through the student model "
                "(set student_module= if the logits come from another submodule)."
            )
        student_logits = self._student_logits
        teacher_logits, mask = self._teacher_logits_and_mask(batch, student_logits)
        kd = soft_target_kl(student_logits, teacher_logits, self.temperature, mask)
        total = (1 - self.alpha) * loss + self.alpha * kd
        batch_size = student_logits.shape[0]
        pl_module.log("train_ce", loss.detach(), batch_size=batch_size)
        pl_module.log("train_kd", kd.detach(), prog_bar=True, batch_size=batch_size)
        self._student_logits = None
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total

    # -- checks at setup ---------------------------------------------------------------------
    def _check_labels(self, pl_module: LightningModule, student: nn.Module) -> None:
        teacher_config = getattr(self.teacher, "config", None)
        student_config = getattr(student, "config", None)
        if teacher_config is None or student_config is None:
            return  # checked on the first batch: the logits' shapes must agree
        if teacher_config.num_labels != student_config.num_labels:
            raise ValueError(
                f"The teacher predicts {teacher_config.num_labels} labels and the student {student_config.num_labels}; "
                "distill from a teacher fine-tuned on the same label set."
            )
        teacher_names, student_names = _label_names(teacher_config), _label_names(student_config)
        student_names = list(getattr(pl_module, "labels", None) or student_names or []) or None
        if teacher_names and student_names and teacher_names != student_names:
            raise ValueError(
                f"Teacher labels {teacher_names} and student labels {student_names} differ (names or order); "
                "the soft targets would teach the wrong classes. Use the teacher's label list for the student."
            )

    def _check_vocabulary(self, student: nn.Module) -> None:
        teacher_vocab = getattr(getattr(self.teacher, "config", None), "vocab_size", None)
        student_vocab = getattr(getattr(student, "config", None), "vocab_size", None)
        if teacher_vocab and student_vocab and teacher_vocab != student_vocab:
            raise ValueError(
                f"The teacher's vocabulary has {teacher_vocab} tokens and the student's {student_vocab}: they "
                "tokenize differently, so the teacher would see other inputs. Use a teacher and student that share "
                "a tokenizer."
            )

    def _check_tokenizers(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from transformers import AutoTokenizer

        from lightning_memopt.tasks.sources import resolve_pretrained

        assert self._teacher_info is not None
        student_tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule else None
        source = self.student_tokenizer or getattr(pl_module, "model_name_or_path", None)
        if source is not None and (self.student_tokenizer or student_tokenizer is None):
            student_tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(source))
        if self._teacher_info.tokenizer_source is None or student_tokenizer is None:
            rank_zero_warn(
                "KnowledgeDistillation could not compare the teacher's and the student's tokenizers (no tokenizer "
                "known for one of them); make sure they tokenize the same way (student_tokenizer=...)."
            )
            return
        teacher_tokenizer = AutoTokenizer.from_pretrained(self._teacher_info.tokenizer_source)
        teacher_ids = teacher_tokenizer(PROBE_TEXT)["input_ids"]
        student_ids = student_tokenizer(PROBE_TEXT)["input_ids"]
        if teacher_ids != student_ids:
            raise ValueError(
                "The teacher and the student tokenize the probe text differently "
                f"({teacher_tokenizer.convert_ids_to_tokens(teacher_ids)[:12]} vs "
                f"{student_tokenizer.convert_ids_to_tokens(student_ids)[:12]}); the teacher would see other inputs. "
                "Use a teacher and student that share a tokenizer."
            )
