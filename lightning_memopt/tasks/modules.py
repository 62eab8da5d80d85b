"""LightningModules that fine-tune any Hugging Face encoder for token or sequence classification.

The label list lives in the hyper-parameters (and so in every checkpoint); the optimizer is AdamW
with linear warm-up and linear decay, all set from the constructor (and so from the CLI); and
:meth:`TransformerTaskModule.export_pretrained` writes a folder plain ``transformers`` loads.

Example:
    >>> module = TokenClassificationModule(  # doctest: +SKIP
    ...     "bert-base-cased", labels=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    >>> module.export_pretrained("exported/")  # doctest: +SKIP
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lightning_memopt.core.checkpoints import read_checkpoint
from lightning_memopt.core.sources import resolve_pretrained
from lightning_memopt.tasks.data import IGNORE_INDEX
from lightning_memopt.tasks.entity_f1 import EntityF1
from lightning_memopt.tasks.optim import (
    build_adamw,
    check_optimizer,
    check_optimizer_strategy,
    linear_warmup_decay,
    offloads_optimizer,
)
from lightning_memopt.tasks.resumable import restore_rng_state, rng_states_of_all_ranks

TASK_KEY = "memopt_task"
RNG_KEY = "memopt_rng_state"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")


def check_labels(labels: list[str] | str | None) -> list[str]:
    """Validate a label list: non-empty, unique strings."""
    if labels == "auto":
        raise ValueError(
            "--model.labels auto is resolved by memopt fit from --data.train_file; in Python, pass the list "
            "(TokenClassificationDataModule(...).infer_labels() reads it from the data)."
        )
    if not labels or isinstance(labels, str):
        raise ValueError(
            "--model.labels is required: the list of label names, e.g. ['O', 'B-PER', 'I-PER'], or auto to take "
            "them from the training data."
        )
    labels = [str(label) for label in labels]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"--model.labels has duplicates: {duplicates}.")
    return labels


class TransformerTaskModule(LightningModule):
    """Common fine-tuning logic; subclasses pick the Auto class and the metrics.

    Args:
        model_name_or_path: the encoder: a hub name (bert-base-cased), a local folder, or pypi:DISTRIBUTION.
        labels: the label names in order, or auto (memopt fit reads them from the training data).
        learning_rate: AdamW's peak learning rate, reached after the warm-up.
        weight_decay: AdamW's decoupled weight decay (not applied to biases and norms).
        warmup_ratio: the share of the run's optimizer steps spent warming the learning rate up from 0.
        warmup_steps: the warm-up in optimizer steps instead (overrides warmup_ratio).
        adam_betas: AdamW's betas.
        adam_epsilon: AdamW's epsilon.
        optimizer: adamw, or bitsandbytes' adamw8bit / paged_adamw8bit (8-bit optimizer state).
        classifier_dropout: dropout before the task head (the model config's value if not given).
        revision: the hub revision (branch, tag or commit) of model_name_or_path.
        trust_remote_code: run the model repository's own Python code; off unless you trust the repository.
    """

    auto_class_name: ClassVar[str]
    has_labels: ClassVar[bool] = True  # a classification task: labels name the head's outputs

    def __init__(
        self,
        model_name_or_path: str = "bert-base-cased",
        labels: list[str] | Literal["auto"] | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        warmup_steps: int | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw",
        classifier_dropout: float | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.labels = check_labels(labels) if self.has_labels else []
        if learning_rate <= 0:
            raise ValueError(f"--model.learning_rate must be positive, got {learning_rate}.")
        check_optimizer(optimizer)
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"--model.warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        self.save_hyperparameters()
        self.hparams["labels"] = self.labels  # as strings, so a checkpoint's list compares equal on resume
        self.model_name_or_path = model_name_or_path
        self.model = self._load_model()
        # from_pretrained returns eval mode and Lightning keeps submodule modes as found: enable dropout.
        self.model.train()

    def _load_model(self) -> nn.Module:
        import transformers

        auto_class = getattr(transformers, self.auto_class_name)
        # Train in float32 whatever dtype the weights were saved in (transformers 5 defaults to "auto");
        # Lightning's precision plugin does any down-casting.
        extra: dict[str, Any] = {
            "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32
        }
        if self.hparams.classifier_dropout is not None:
            extra["classifier_dropout"] = self.hparams.classifier_dropout
        if self.has_labels:
            extra["num_labels"] = len(self.labels)
            extra["id2label"] = dict(enumerate(self.labels))
            extra["label2id"] = {label: index for index, label in enumerate(self.labels)}
        source = resolve_pretrained(self.model_name_or_path)
        try:
            return auto_class.from_pretrained(
                source,
                revision=self.hparams.revision,
                trust_remote_code=self.hparams.trust_remote_code,
                **extra,
            )
        except OSError as error:
            raise OSError(f"Could not load --model.model_name_or_path={self.model_name_or_path!r}: {error}") from error

    @staticmethod
    def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries of a batch the Hugging Face model takes (drops helper keys like ``word_starts``)."""
        return {key: value for key, value in batch.items() if key in MODEL_INPUTS}

    @override
    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(**self.model_inputs(batch)).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        output = self(**self.model_inputs(batch))
        self.log(f"{stage}_loss", output.loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        self.update_metrics(output, batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val_{name}": value for name, value in self.compute_metrics().items()})

    @override
    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test_{name}": value for name, value in self.compute_metrics().items()})

    def update_metrics(self, output: Any, batch: dict[str, Tensor]) -> None:
        """Accumulate one evaluation batch (the model's output: ``logits``, ``loss``) into the task's metrics
        (implemented by each task)."""
        raise NotImplementedError

    def compute_metrics(self) -> dict[str, Tensor]:
        """The epoch's metrics (synchronised across ranks), then reset (implemented by each task)."""
        raise NotImplementedError

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        check_optimizer_strategy(hp.optimizer, self.trainer)
        betas = tuple(hp.adam_betas)
        offloaded = offloads_optimizer(self.trainer)
        optimizer = build_adamw(
            self, hp.learning_rate, hp.weight_decay, betas, hp.adam_epsilon, hp.optimizer, offloaded
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_ratio * total)
        scheduler = linear_warmup_decay(optimizer, warmup_steps=warmup, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # FSDP2 swaps the class for a subclass (FSDPTokenClassificationModule): record ours.
        checkpoint[TASK_KEY] = next((c.__name__ for c in type(self).__mro__ if c.__name__ in TASK_CLASSES), None)
        # Dropout draws from these: restoring them makes a resumed run continue like an uninterrupted one.
        checkpoint[RNG_KEY] = rng_states_of_all_ranks()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("labels")
        if saved is not None and list(saved) != self.labels:
            raise ValueError(
                f"The checkpoint was trained with labels {list(saved)} but --model.labels is {self.labels}; "
                "use the checkpoint's label list (or start a new run instead of resuming)."
            )
        if (rng := checkpoint.get(RNG_KEY)) is not None:
            restore_rng_state(rng, self.global_rank)

    def export_pretrained(self, output_dir: str | Path) -> Path:
        """Write model, config (with label names) and tokenizer to a folder ``from_pretrained`` loads."""
        from transformers import AutoTokenizer

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(output_dir)
        AutoTokenizer.from_pretrained(resolve_pretrained(self.model_name_or_path)).save_pretrained(output_dir)
        return output_dir


class TokenClassificationModule(TransformerTaskModule):
    """Token classification (NER) with entity-level micro P/R/F1 and per-type F1 (seqeval semantics).

    Logged: ``train_loss``, ``val_loss``, ``val_precision``, ``val_recall``, ``val_f1``, ``val_f1_<TYPE>``
    (``test_*`` under ``trainer.test``).
    """

    auto_class_name = "AutoModelForTokenClassification"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entity_f1 = EntityF1(self.labels)

    @override
    def update_metrics(self, output: Any, batch: dict[str, Tensor]) -> None:
        self.entity_f1.update(output.logits.argmax(-1), batch["labels"], mask=batch.get("word_starts"))

    @override
    def compute_metrics(self) -> dict[str, Tensor]:
        scores = self.entity_f1.compute()
        self.entity_f1.reset()
        return scores


class SequenceClassificationModule(TransformerTaskModule):
    """Sentence (pair) classification with accuracy and macro F1 from torchmetrics.

    Logged: ``train_loss``, ``val_loss``, ``val_accuracy``, ``val_macro_f1`` (``test_*`` under ``trainer.test``).
    """

    auto_class_name = "AutoModelForSequenceClassification"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        num_classes = len(self.labels)
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.macro_f1 = MulticlassF1Score(num_classes, average="macro")

    @override
    def update_metrics(self, output: Any, batch: dict[str, Tensor]) -> None:
        predictions = output.logits.argmax(-1)
        self.accuracy.update(predictions, batch["labels"])
        self.macro_f1.update(predictions, batch["labels"])

    @override
    def compute_metrics(self) -> dict[str, Tensor]:
        scores = {"accuracy": self.accuracy.compute(), "macro_f1": self.macro_f1.compute()}
        self.accuracy.reset()
        self.macro_f1.reset()
        return scores


class CausalLMModule(TransformerTaskModule):
    """Causal language-model fine-tuning (Llama, Qwen2, SmolLM2, GPT-2, ...) on texts or prompt/completion pairs.

    The loss is the model's own (next-token cross-entropy over the positions whose label is not -100: the
    completion when :class:`~lightning_memopt.tasks.CausalLMDataModule` masks the prompt). Logged: ``train_loss``,
    ``val_loss``, ``val_token_loss`` (mean over all validation tokens) and ``val_perplexity`` (its exponential).
    ``labels`` and ``classifier_dropout`` do not apply.
    """

    auto_class_name = "AutoModelForCausalLM"
    has_labels = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_loss = MeanMetric()

    @override
    def update_metrics(self, output: Any, batch: dict[str, Tensor]) -> None:
        tokens = batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()  # the positions the shifted loss counts
        self.token_loss.update(output.loss.detach(), weight=tokens)

    @override
    def compute_metrics(self) -> dict[str, Tensor]:
        mean = self.token_loss.compute()
        self.token_loss.reset()
        return {"token_loss": mean, "perplexity": mean.exp()}


TASK_CLASSES: dict[str, type[TransformerTaskModule]] = {
    cls.__name__: cls for cls in (TokenClassificationModule, SequenceClassificationModule, CausalLMModule)
}


def load_task_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> TransformerTaskModule:
    """Load one of our task modules from a Lightning checkpoint without executing anything in it.

    The checkpoint (a file, or the sharded folder FSDP2 writes) is read with ``weights_only=True`` and the
    class is looked up by name in an allow-list of our task modules, never imported from a path found in the file.
    """
    checkpoint = read_checkpoint(path, map_location)
    name = checkpoint.get(TASK_KEY)
    if name not in TASK_CLASSES:
        raise ValueError(
            f"{path} is not a checkpoint of a lightning_memopt task module (it names {name!r}); "
            f"expected one of {sorted(TASK_CLASSES)}."
        )
    source: str | Path | io.BytesIO = path
    if Path(path).is_dir():  # hand Lightning the gathered checkpoint as one file
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    # Remote code is never enabled by what a checkpoint says.
    return TASK_CLASSES[name].load_from_checkpoint(
        source, map_location=map_location, weights_only=True, trust_remote_code=False
    )
