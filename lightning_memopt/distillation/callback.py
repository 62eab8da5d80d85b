"""``KnowledgeDistillation``: train any LightningModule against a frozen teacher, without edits to the module.

How it reaches into a module that knows nothing of it:

1. A forward hook on the student's model (by default the first Hugging Face model with a task head
   inside the LightningModule, else the LightningModule itself) keeps the logits of the last forward.
2. The module's ``training_step`` is wrapped on the instance (``core.patching.InstancePatches``, undone
   exactly at teardown or on an exception: Lightning has no hook that can change a step's loss): the
   original runs unchanged and returns its own loss ``L`` (for our task modules: cross entropy); the wrapper runs the teacher on the same
   batch and returns ``(1 - alpha) * L + alpha * T² * KL(teacher ‖ student)``, logging ``train_ce``
   (= ``L``), ``train_kd`` and that total, the loss the optimizer sees, as ``train_total`` (the module's
   own ``train_loss`` stays ``L``). ``validation_step`` is wrapped the same way to log ``val_kd`` and
   ``val_agreement`` (how often student and teacher pick the same class) next to the module's own
   metrics; when fit ends, the student's monitored metrics are printed beside the teacher's (as its
   checkpoint recorded them). The projections of intermediate-layer transfer join the trainer's first
   optimizer as one more parameter group (``trainer.optimizers``), before a resume restores its state.

Optional intermediate-layer transfer (hidden-state MSE through learned projections, attention KL,
see :mod:`.intermediate`) adds ``hidden_weight * hidden + attention_weight * attention``; the student
and the teacher then return hidden states (and attention maps, computed with eager attention) during
fit, and their configs are restored afterwards. ``alpha`` and ``temperature`` can move linearly to
``alpha_end`` / ``temperature_end`` over the run.

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

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_memopt.core.frozen import quantize_frozen
from lightning_memopt.core.patching import InstancePatches
from lightning_memopt.core.run_points import linear_ramp
from lightning_memopt.core.strategies import refuse_strategies
from lightning_memopt.distillation.checks import check_labels, check_tokenizers, check_vocabulary
from lightning_memopt.distillation.intermediate import LayerTransfer
from lightning_memopt.distillation.losses import (
    check_alpha_temperature,
    head_chunked_kl,
    position_mask,
    soft_target_kl,
)
from lightning_memopt.distillation.teacher import Teacher, check_teacher_source, freeze, load_teacher

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
FROZEN_BITS = ("int8", "nf4")
FUSED_CHUNK_ROWS = 64  # fuse_head without chunk_rows: small chunks keep the extra peak under one logits tensor
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


def has_head(model: nn.Module) -> bool:
    """A transformers model with a task or LM head (``...ForX``, GPT-2's ``GPT2LMHeadModel``, any model that generates)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    name = type(model).__name__
    return "For" in name or "LMHead" in name or bool(getattr(model, "can_generate", lambda: False)())


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` scores logits at ``t`` against the token at ``t + 1`` (decoder LMs)."""
    return bool(getattr(model, "can_generate", lambda: False)()) and not getattr(
        getattr(model, "config", None), "is_encoder_decoder", False
    )


def lm_heads(student: nn.Module, teacher: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The student's and the teacher's linear LM heads (``get_output_embeddings()``), for ``fuse_head``."""
    heads = []
    for side, model in (("student", student), ("teacher", teacher)):
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if not isinstance(head, nn.Linear) or getattr(model, "base_model", model) is model:
            raise ValueError(
                f"fuse_head needs a language model with a linear LM head on both sides; the {side} "
                f"({type(model).__name__}) has {type(head).__name__ if head is not None else 'none'} "
                "(get_output_embeddings). Distil from its logits: fuse_head=False."
            )
        heads.append(head)
    return heads[0], heads[1]


def find_student_model(pl_module: LightningModule) -> tuple[str, nn.Module]:
    """The first Hugging Face model with a task or LM head inside ``pl_module``, else ``pl_module`` itself."""
    for name, module in pl_module.named_modules():
        if has_head(module):
            return name, module
    return "", pl_module


def add_param_group(trainer: Trainer, params: list[nn.Parameter]) -> None:
    """Add ``params`` (no weight decay) to the trainer's first optimizer, following its first group's schedule.

    Its LR schedulers are extended too: PyTorch's schedulers keep one entry per group. Called in
    ``on_fit_start``, before Lightning restores optimizer states on a resume.
    """
    if not trainer.optimizers:
        raise ValueError("KnowledgeDistillation found no optimizer (configure_optimizers) for its projections.")
    optimizer = trainer.optimizers[0]
    first = optimizer.param_groups[0]
    group = {"params": params, "weight_decay": 0.0, "lr": first.get("initial_lr", first["lr"])}
    optimizer.add_param_group(group)
    group = optimizer.param_groups[-1]
    group["initial_lr"] = group["lr"]
    group["lr"] = first["lr"]  # where the schedule stands now
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        scheduler.base_lrs.append(group["initial_lr"])
        scheduler._last_lr.append(group["lr"])
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if isinstance(lambdas, list):
            lambdas.append(lambdas[0])


class KnowledgeDistillation(Callback):
    """Add a soft-target distillation loss from a frozen teacher to any LightningModule's training loss.

    Args:
        teacher: a ``.ckpt`` of our task modules, a model folder, a hub name, ``pypi:DIST``, or an ``nn.Module``.
        alpha: weight of the distillation term, in [0, 1]; the module's own loss gets ``1 - alpha``.
        temperature: softmax temperature T > 0; the KL term is scaled by T².
        alpha_end / temperature_end: values reached linearly at the end of the run (``None``: constant).
        hidden_layers / hidden_weight: ``{student hidden-state index: teacher index}`` and the weight of
            their MSE (0 = off); a projection is learned when the widths differ.
        attention_layers / attention_weight: ``{student layer: teacher layer}`` and the weight of their
            attention-distribution KL (0 = off).
        teacher_precision: ``"32"``, ``"bf16"`` or ``"16"`` to cast the teacher; ``"int8"`` or ``"nf4"`` to keep
            its Linear weights in 8 or 4 bits with bitsandbytes (:func:`~lightning_memopt.core.frozen.quantize_frozen`;
            the task head stays float32); ``None`` keeps its dtype.
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
        chunk_rows: compute the KD loss this many positions at a time, with its gradient w.r.t. the student
            logits (:class:`~lightning_memopt.distillation.losses.ChunkedKL`): for LLM vocabularies, where the
            float32 softmax temporaries of a whole sequence take about six logits-sized tensors. Chunked, the
            loss's extra memory is the logits' gradient (one tensor of their size and dtype, handed to autograd
            without a copy) plus about two float32 chunks of ``chunk_rows`` x vocabulary (at 2,048 x 32,000:
            1.28 logits tensors with 256 rows, 1.09 with 64; docs/results/kd-memory.md). The same value and
            gradient as one pass; validation computes ``val_kd`` in chunks too, without the gradient.
            ``None`` computes it in one pass.
        top_k: distil on the teacher's ``k`` most likely classes per position only (its distribution renormalised
            over them, against the student's log-probabilities of those classes); ``None`` uses all of them.
        fuse_head: for LMs (student and teacher with a linear LM head, ``get_output_embeddings()``): compute the
            training KD loss from the hidden states entering the two heads, ``chunk_rows`` positions at a time
            (64 if unset: an extra peak of 0.76 logits tensors all told at 2,048 x 32,000, 1.23 with 256), each
            chunk's logits made, scored and dropped with their gradients
            (:func:`~lightning_memopt.distillation.losses.head_chunked_kl`). The teacher runs its body only
            (``base_model``), so neither its logits nor the KD loss's full-sequence gradient of the student's
            logits exist: what KD adds beyond the teacher's weights is the teacher's hidden states, one chunk of
            logits and the hidden states' gradient (the head weight's gradient, which any loss makes, is handed
            to autograd). Checked at the first step: the heads applied to those hidden states must give the
            models' logits (not so for soft-capped logits), else an error says to turn it off. Validation's
            ``val_kd`` still compares the models' logits.
    """

    def __init__(
        self,
        teacher: str | nn.Module,
        alpha: float = 0.5,
        temperature: float = 2.0,
        alpha_end: float | None = None,
        temperature_end: float | None = None,
        hidden_layers: dict[int, int] | None = None,
        hidden_weight: float = 0.0,
        attention_layers: dict[int, int] | None = None,
        attention_weight: float = 0.0,
        teacher_precision: Literal["32", "bf16", "16", "int8", "nf4"] | None = None,
        student_module: str | None = None,
        student_tokenizer: str | None = None,
        batch_to_teacher_inputs: Callable[[Any], dict[str, Tensor]] | None = None,
        batch_to_labels: Callable[[Any], Tensor | None] | None = None,
        outputs_to_logits: Callable[[Any], Tensor] | None = None,
        chunk_rows: int | None = None,
        top_k: int | None = None,
        fuse_head: bool = False,
    ) -> None:
        check_alpha_temperature(alpha, temperature)
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive number of positions, or None, got {chunk_rows}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of classes, or None (all of them), got {top_k}.")
        self.chunk_rows, self.top_k, self.fuse_head = chunk_rows, top_k, fuse_head
        self._heads: tuple[nn.Linear, nn.Linear] | None = None  # (student's, teacher's) LM head when fused
        self._student_hidden: Tensor | None = None  # what entered the student's head in this training step
        self._recording = False  # True from a training step's start until its KD loss takes the hidden states
        self._head_hook: Any = None
        self._fusion_checked = False
        check_alpha_temperature(alpha if alpha_end is None else alpha_end, temperature_end or temperature)
        check_teacher_source(teacher)
        if teacher_precision is not None and teacher_precision not in (*DTYPES, *FROZEN_BITS):
            raise ValueError(
                f"teacher_precision must be one of {[*DTYPES, *FROZEN_BITS]} or None, got {teacher_precision!r}."
            )
        self.source = teacher
        self.alpha, self.alpha_end = alpha, alpha_end
        self.temperature, self.temperature_end = temperature, temperature_end
        self.layers = LayerTransfer(hidden_layers, hidden_weight, attention_layers, attention_weight)
        self.teacher_precision = teacher_precision
        self._quantized = False
        self.student_module = student_module
        self.student_tokenizer = student_tokenizer
        self.batch_to_teacher_inputs = batch_to_teacher_inputs or default_teacher_inputs
        self.batch_to_labels = batch_to_labels or default_labels
        self.outputs_to_logits = outputs_to_logits or default_logits
        self.teacher: nn.Module | None = None
        self._teacher_info: Teacher | None = None
        self._student_output: Any = None
        self._teacher_logits_bytes = 0  # the last step's teacher logits, for MemoryMonitor
        self._hook: Any = None
        self._causal = False  # a decoder LM student: its loss scores position t against label t + 1
        self._patches = InstancePatches()
        self._restore_config: dict[str, Any] = {}
        self._total_steps = 0
        self._saved_projections: dict[str, Tensor] | None = None

    # -- state: only the learned projections (the teacher is never in a checkpoint) -------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"projections": self.layers.state_dict()} if len(self.layers.projections) else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_projections = state_dict.get("projections")
        if self._saved_projections and len(self.layers.projections):
            self.layers.load_state_dict(self._saved_projections)

    def memory_report(self, device_type: str | None = None) -> dict[str, int]:
        """What distillation adds to a training step's memory, for ``MemoryMonitor``'s breakdown: the frozen
        teacher's weights (and buffers) and the teacher logits of the last step, held until its KD loss is done."""
        if self.teacher is None:
            return {}
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]
        held = sum(t.numel() * t.element_size() for t in tensors if device_type is None or t.device.type == device_type)
        output = "teacher hidden states (KD)" if self.fuse_head else "teacher logits (KD)"
        return {"teacher weights (frozen)": held, output: self._teacher_logits_bytes}

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_strategies(
            trainer,
            "KnowledgeDistillation",
            UNSUPPORTED_STRATEGIES,
            "its sharding would have to leave the teacher out of the student's wrapping",
            "--trainer.strategy ddp, or ModelParallelStrategy (FSDP2)",
        )
        if self.fuse_head:
            refuse_strategies(
                trainer,
                "KnowledgeDistillation(fuse_head=True)",
                ("ModelParallelStrategy",),
                "the loss reads the LM head's weight after its forward, when FSDP2 has sharded it again",
                "fuse_head=False (chunk_rows keeps the logits route's memory down), or DDP",
            )
        if self._teacher_info is None:
            self._teacher_info = load_teacher(self.source)
        dtype = DTYPES.get(self.teacher_precision or "")
        self.teacher = freeze(self._teacher_info.model, dtype)
        if self.teacher_precision in FROZEN_BITS and not self._quantized:
            quantize_frozen(self.teacher, self.teacher_precision)  # weights quantized on the move to the device
            self._quantized = True
        _, student = self._student(pl_module)
        teacher_config, student_config = getattr(self.teacher, "config", None), getattr(student, "config", None)
        if teacher_config is not None and student_config is not None:
            check_labels(teacher_config, student_config, getattr(pl_module, "labels", None))
            check_vocabulary(teacher_config, student_config)
        self._check_tokenizers(trainer, pl_module)
        if self.layers.active:
            if teacher_config is None or student_config is None:
                raise ValueError(
                    "hidden_layers/attention_layers need Hugging Face models on both sides (with a config); "
                    "set student_module= to the student's transformers model."
                )
            self.layers.bind(student_config, teacher_config)
            if self._saved_projections:  # restored before setup created them
                self.layers.load_state_dict(self._saved_projections)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.teacher is not None
        self.teacher.to(pl_module.device)
        self.layers.to(pl_module.device)
        self._total_steps = int(trainer.estimated_stepping_batches)
        name, student = self._student(pl_module)
        self._causal = is_causal_lm(student)
        if self.layers.active:
            self._return_intermediates(student)
        self._hook = student.register_forward_hook(self._keep_output)
        if self.fuse_head:
            self._heads = lm_heads(student, self.teacher)
            self._head_hook = self._heads[0].register_forward_pre_hook(self._keep_head_input)
        if len(self.layers.projections):
            add_param_group(trainer, list(self.layers.parameters()))
        self._patches.wrap(pl_module, "training_step", lambda step: self._distilling(pl_module, step))
        self._patches.wrap(pl_module, "validation_step", lambda step: self._comparing(pl_module, step))
        rank_zero_info(
            f"KnowledgeDistillation: teacher {type(self.teacher).__name__} "
            f"({sum(p.numel() for p in self.teacher.parameters()):,} parameters, frozen) on the logits of "
            f"{name or type(pl_module).__name__}; alpha {self.alpha}, temperature {self.temperature}"
            + (f", hidden layers {self.layers.hidden_layers}" if self.layers.hidden_layers else "")
            + (f", attention layers {self.layers.attention_layers}" if self.layers.attention_layers else "")
            + "."
        )

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.world_size > 1:  # the projections are not inside DDP's wrapper: average their gradients here
            for param in self.layers.parameters():
                if param.grad is not None:
                    param.grad = trainer.strategy.reduce(param.grad, reduce_op="mean")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")
        rank_zero_info(self.summary(trainer))

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # a failed run leaves the module as it found it

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None
        self._patches.restore()  # the module's own steps again
        if self._restore_config:
            _, student = self._student(pl_module)
            attn = self._restore_config.pop("attn", None)
            for key, value in self._restore_config.items():
                setattr(student.config, key, value)
            if attn is not None:
                student.set_attn_implementation(attn)
            self._restore_config = {}

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

    def _distilling(self, pl_module: LightningModule, step: Callable[..., Any]) -> Callable[..., Any]:
        """The module's ``training_step``, its loss mixed with the distillation loss."""

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            self._student_output = None
            self._student_hidden, self._recording = None, self._heads is not None
            return self._add_distillation(pl_module, batch, step(batch, *args, **kwargs))

        return training_step

    def _comparing(self, pl_module: LightningModule, step: Callable[..., Any]) -> Callable[..., Any]:
        """The module's ``validation_step``, then ``val_kd`` and ``val_agreement`` logged beside its metrics."""

        def validation_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            self._student_output = None
            output = step(batch, *args, **kwargs)
            self._log_validation(pl_module, batch)
            return output

        return validation_step

    def _return_intermediates(self, student: nn.Module) -> None:
        """Make the student and the teacher return hidden states / attention maps during fit."""
        assert self.teacher is not None
        config = student.config
        self._restore_config = {"output_hidden_states": config.output_hidden_states}
        if self.layers.hidden_layers:
            config.output_hidden_states = True
        if self.layers.attention_layers:
            self._restore_config.update(output_attentions=config.output_attentions, attn=config._attn_implementation)
            student.set_attn_implementation("eager")  # SDPA does not return attention maps
            config.output_attentions = True
            self.teacher.set_attn_implementation("eager")

    def _keep_output(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._student_output = output

    def _keep_head_input(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self._recording:  # the module's own forward, not the KD loss's calls of the head (or their recomputation)
            self._student_hidden = inputs[0]

    def _teacher_output(self, batch: Any, body_only: bool = False) -> tuple[Any, dict[str, Tensor]]:
        """The teacher's output on ``batch`` (with ``body_only``, its base model's: hidden states, no logits)."""
        assert self.teacher is not None
        inputs = self.batch_to_teacher_inputs(batch)
        extra = {}
        if self.layers.hidden_layers:
            extra["output_hidden_states"] = True
        if self.layers.attention_layers:
            extra["output_attentions"] = True
        with torch.no_grad():
            model = self.teacher.base_model if body_only else self.teacher
            return model(**inputs, **extra), inputs

    def _label_mask(self, batch: Any, student_logits: Tensor) -> Tensor | None:
        """The positions the task loss counts (shifted by one for causal LMs, as their loss is)."""
        labels = self.batch_to_labels(batch)
        if student_logits.dim() != 3 or labels is None:
            return None
        return position_mask(labels, self._causal)

    def _log_validation(self, pl_module: LightningModule, batch: Any) -> None:
        if self._student_output is None:
            return  # a validation step without a forward through the student: nothing to compare
        student_logits = self.outputs_to_logits(self._student_output)
        teacher_output, _ = self._teacher_output(batch)
        teacher_logits = self.outputs_to_logits(teacher_output).to(student_logits.dtype)
        mask = self._label_mask(batch, student_logits)
        kd = soft_target_kl(student_logits, teacher_logits, self.temperature, mask, self.chunk_rows, self.top_k)
        same = student_logits.argmax(-1) == teacher_logits.argmax(-1)
        agreement = (same[mask] if mask is not None else same).float().mean()
        options = {"batch_size": student_logits.shape[0], "sync_dist": True}
        pl_module.log("val_kd", kd, **options)
        pl_module.log("val_agreement", agreement, **options)
        self._student_output = None

    def _add_distillation(self, pl_module: LightningModule, batch: Any, output: Any) -> Any:
        loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor) or self._student_output is None:
            raise RuntimeError(
                "KnowledgeDistillation found no student loss or logits in this training step: training_step must "
                "return the loss (or a dict with 'loss') after a forward through the student model "
                "(set student_module= if the logits come from another submodule)."
            )
        step = pl_module.trainer.global_step
        alpha = linear_ramp(self.alpha, self.alpha_end, step, self._total_steps)
        temperature = linear_ramp(self.temperature, self.temperature_end, step, self._total_steps)
        student_logits = self.outputs_to_logits(self._student_output)
        mask = self._label_mask(batch, student_logits)
        teacher_output, teacher_inputs = self._teacher_output(batch, body_only=self._heads is not None)
        if self._heads is not None:
            kd = self._fused_kd(batch, student_logits, teacher_output.last_hidden_state, temperature, mask)
        else:
            teacher_logits = self.outputs_to_logits(teacher_output).to(student_logits.dtype)
            self._teacher_logits_bytes = teacher_logits.numel() * teacher_logits.element_size()
            kd = soft_target_kl(student_logits, teacher_logits, temperature, mask, self.chunk_rows, self.top_k)
        total = (1 - alpha) * loss + alpha * kd
        batch_size = student_logits.shape[0]
        if self.layers.active:
            attention_mask = teacher_inputs.get("attention_mask")
            parts = self.layers(self._student_output, teacher_output, attention_mask)
            total = total + self.layers.weighted(parts)
            for name, value in parts.items():
                pl_module.log(f"train_{name}", value.detach(), batch_size=batch_size)
        pl_module.log("train_ce", loss.detach(), batch_size=batch_size)
        pl_module.log("train_kd", kd.detach(), prog_bar=True, batch_size=batch_size)
        pl_module.log("train_total", total.detach(), prog_bar=True, batch_size=batch_size)
        if self.alpha_end is not None or self.temperature_end is not None:
            pl_module.log("kd_alpha", alpha, batch_size=batch_size)
            pl_module.log("kd_temperature", temperature, batch_size=batch_size)
        self._student_output = None
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total

    def _fused_kd(
        self, batch: Any, student_logits: Tensor, teacher_hidden: Tensor, temperature: float, mask: Tensor | None
    ) -> Tensor:
        """The KD loss from the hidden states entering both LM heads (``fuse_head``)."""
        assert self._heads is not None
        hidden, self._student_hidden, self._recording = self._student_hidden, None, False
        if hidden is None:
            raise RuntimeError(
                "fuse_head: the training step's forward never called the student's LM head "
                f"({type(self._heads[0]).__name__}); distil from the logits instead: fuse_head=False."
            )
        student_head, teacher_head = self._heads
        if not self._fusion_checked:
            self._check_fusion(batch, student_logits, hidden, teacher_hidden)
        self._teacher_logits_bytes = teacher_hidden.numel() * teacher_hidden.element_size()
        chunk = self.chunk_rows or FUSED_CHUNK_ROWS
        return head_chunked_kl(hidden, student_head, teacher_hidden, teacher_head, temperature, mask, chunk, self.top_k)

    def _check_fusion(self, batch: Any, student_logits: Tensor, hidden: Tensor, teacher_hidden: Tensor) -> None:
        """Once: the heads applied to the hidden states give the models' own logits (a few positions each)."""
        assert self._heads is not None and self.teacher is not None
        student_head, teacher_head = self._heads
        # a causal LM's first positions do not see the rest: a short prefix of one row is enough and cheap
        length = 8 if self._causal else None
        inputs = {key: value[:1, :length] for key, value in self.batch_to_teacher_inputs(batch).items()}
        with torch.no_grad():
            pairs = {
                "student": (student_head(hidden[:1, :length]), student_logits[:1, :length]),
                "teacher": (teacher_head(teacher_hidden[:1, :length]), self.outputs_to_logits(self.teacher(**inputs))),
            }
        for side, (from_head, logits) in pairs.items():
            if not torch.allclose(from_head.float(), logits.float(), rtol=1e-3, atol=1e-3):
                raise ValueError(
                    f"fuse_head: the {side}'s LM head applied to the hidden states entering it does not give its "
                    "logits (soft-capped or scaled logits?); distil from the logits instead: fuse_head=False."
                )
        self._fusion_checked = True

    # -- checks at setup ---------------------------------------------------------------------
    def _check_tokenizers(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from transformers import AutoTokenizer

        from lightning_memopt.core.sources import resolve_pretrained

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
        check_tokenizers(AutoTokenizer.from_pretrained(self._teacher_info.tokenizer_source), student_tokenizer)
