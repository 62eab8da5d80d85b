"""A compression plan: an ordered list of training stages, read from YAML into frozen dataclasses.

Each stage is one ``memopt fit`` run on top of the task recipe, with the weights of the stage before it (or
the teacher's) and what the stage adds::

    name: ner-small
    kd: {alpha: 0.5, temperature: 2.0}         # KnowledgeDistillation options for stages that distil
    stages:
      - name: student
        student_layers: [0, 2, 4]              # cut a student of these teacher layers from the start weights
        overlay:                               # a LightningCLI overlay, as recipes/*/ overlays
          trainer: {max_epochs: 18}
    final: {format: openvino, int8: true, trim_vocabulary: true}   # the deployable artefact

Stage keys (all optional but ``name``):

- ``start``: ``teacher`` or ``previous`` (default: the teacher's weights for the first stage, else the previous
  stage's);
- ``student_layers``: keep only these encoder layers of the start weights (``memopt student``);
- ``distill``: learn from the teacher with ``KnowledgeDistillation`` and the plan's ``kd`` options (default true);
- ``keep_mask``: hold the previous stage's unstructured sparsity fixed (a constant ``PruningScheduler`` at its
  final sparsity and scope), for learning-rate rewinding;
- ``qat``: ``QuantizationAwareTraining`` options (``{}`` for its defaults);
- ``openvino_qat``: ``OpenVINOQuantizationAwareTraining`` options (``{}`` for its defaults): the stage trains
  NNCF's static int8 model, whose learned scales the final OpenVINO (or ONNX QDQ) graph carries; it must be the
  last stage, with ``final: {format: openvino, int8: true}`` (or ``onnx``) and no vocabulary trimming;
- ``shrink``: hand the next stage (and the final export) the model with structurally pruned heads and
  neurons cut out;
- ``configs``: overlay files (e.g. ``recipes/pruning/unstructured-80.yaml``), before ``overlay``;
- ``overlay``: an inline LightningCLI overlay (callbacks with ``callbacks+``, the budget with
  ``trainer.max_epochs`` or ``max_steps``).

:func:`read_plan` checks everything it can without the teacher and names the stage and key of a mistake.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED_NAMES = {"final", "teacher"}
FORMATS = ("transformers", "onnx", "openvino")


class PlanError(ValueError):
    """A compression plan that cannot run as written; the message names the stage, the key and the fix."""


@dataclass(frozen=True)
class Stage:
    """One training stage of a plan (see the module docstring for each key)."""

    name: str
    start: Literal["teacher", "previous"] | None = None
    student_layers: tuple[int, ...] | None = None
    distill: bool = True
    keep_mask: bool = False
    qat: dict[str, Any] | None = None
    openvino_qat: dict[str, Any] | None = None
    shrink: bool = False
    configs: tuple[str, ...] = ()
    overlay: dict[str, Any] = field(default_factory=dict)

    def callback_options(self, class_name: str) -> dict[str, Any] | None:
        """The ``init_args`` of the overlay's callback ``class_name`` (``None``: the overlay adds none)."""
        for callback in (self.overlay.get("trainer") or {}).get("callbacks+") or []:
            if str(callback.get("class_path", "")).rsplit(".", 1)[-1] == class_name:
                return dict(callback.get("init_args") or {})
        return None

    def fingerprint(self) -> str:
        """A short hash of what the stage does, to notice a plan that changed under a finished stage."""
        keys = asdict(self)
        if keys["openvino_qat"] is None:  # a key added later: unset, it leaves earlier runs' hashes as they were
            del keys["openvino_qat"]
        text = json.dumps(keys, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FinalExport:
    """How ``D/final/`` is written from the last stage.

    ``format``, ``int8`` and ``sparse`` are ``memopt export``'s options; ``trim_vocabulary`` keeps only the word
    pieces the training data uses (plus ``keep_words``' pieces and the vocabulary's first ``keep_first_pieces``,
    its most frequent ones, which keep more unseen words whole) in the embeddings and tokenizer;
    ``calibration_sentences`` training sentences calibrate OpenVINO's int8; ``min_agreement`` is the share of
    parity positions where an int8 graph must pick the float model's label; ``embedding_bits: 4`` stores the
    embedding tables of an OpenVINO int8 artefact in int4 (``memopt export --embedding_bits 4``).
    """

    format: Literal["transformers", "onnx", "openvino"] = "transformers"
    int8: bool = False
    sparse: bool = False
    trim_vocabulary: bool = False
    keep_words: tuple[str, ...] = ()
    keep_first_pieces: int = 0
    calibration_sentences: int = 300
    min_agreement: float = 0.995
    embedding_bits: int = 8


@dataclass(frozen=True)
class Plan:
    """A named, ordered list of stages, the distillation options they share and the final export."""

    name: str
    stages: tuple[Stage, ...]
    kd: dict[str, Any] = field(default_factory=dict)
    final: FinalExport = field(default_factory=FinalExport)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise PlanError(f"plan {self.name}: no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    def start_of(self, index: int) -> str:
        """Where stage ``index`` takes its weights from: ``teacher`` or the name of an earlier stage."""
        stage = self.stages[index]
        if stage.start == "teacher" or index == 0:
            return "teacher"
        return self.stages[index - 1].name


def _check_keys(given: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _stage(raw: Any, index: int, plan_name: str) -> Stage:
    where = f"plan {plan_name}, stage {index + 1}"
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: a stage is a mapping with at least `name`, got {raw!r}")
    _check_keys(raw, {f.name for f in fields(Stage)}, where)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name) or name in RESERVED_NAMES:
        raise PlanError(
            f"{where}: `name` must be a folder-safe word (letters, digits, '-', '_', '.') other than "
            f"{sorted(RESERVED_NAMES)}, got {name!r}"
        )
    where = f"plan {plan_name}, stage {name}"
    start = raw.get("start")
    if start not in (None, "teacher", "previous"):
        raise PlanError(f"{where}: `start` is `teacher` or `previous`, got {start!r}")
    layers = raw.get("student_layers")
    if layers is not None:
        if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
            raise PlanError(f"{where}: `student_layers` is a non-empty list of teacher layer indices, got {layers!r}")
        if layers != sorted(set(layers)):
            raise PlanError(f"{where}: `student_layers` must be increasing without repeats, got {layers}")
    quantizers = {}
    for key, callback in (("qat", "QuantizationAwareTraining"), ("openvino_qat", "OpenVINOQuantizationAwareTraining")):
        options = {} if raw.get(key) is True else raw.get(key)
        if options is not None and options is not False and not isinstance(options, dict):
            raise PlanError(f"{where}: `{key}` is a mapping of {callback} options (`{{}}`: defaults)")
        quantizers[key] = options if isinstance(options, dict) else None
    if quantizers["qat"] is not None and quantizers["openvino_qat"] is not None:
        raise PlanError(f"{where}: `qat` and `openvino_qat` both quantize the model; keep one of them")
    for key in ("distill", "keep_mask", "shrink"):
        if key in raw and not isinstance(raw[key], bool):
            raise PlanError(f"{where}: `{key}` is true or false, got {raw[key]!r}")
    configs = raw.get("configs") or []
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise PlanError(f"{where}: `configs` is a list of overlay file paths, got {configs!r}")
    overlay = raw.get("overlay") or {}
    if not isinstance(overlay, dict):
        raise PlanError(f"{where}: `overlay` is a LightningCLI config mapping, got {overlay!r}")
    if "ckpt_path" in overlay or "model_name_or_path" in ((overlay.get("model") or {}).get("init_args") or {}):
        raise PlanError(
            f"{where}: `overlay` sets the stage's weights or checkpoint, which memopt compress chooses (`start`, "
            "`student_layers`) and resumes itself; remove model_name_or_path / ckpt_path from it"
        )
    return Stage(
        name=name,
        start=start,
        student_layers=tuple(layers) if layers is not None else None,
        distill=raw.get("distill", True),
        keep_mask=raw.get("keep_mask", False),
        qat=quantizers["qat"],
        openvino_qat=quantizers["openvino_qat"],
        shrink=raw.get("shrink", False),
        configs=tuple(configs),
        overlay=overlay,
    )


def _check_order(plan: Plan) -> None:
    """Refuse stage sequences that would undo each other or need something an earlier stage does not give."""
    pruned_by: Stage | None = None
    quantized_by: Stage | None = None
    for index, stage in enumerate(plan.stages):
        where = f"plan {plan.name}, stage {stage.name}"
        prunes = stage.callback_options("PruningScheduler") is not None
        if quantized_by is not None and (prunes or stage.student_layers) and plan.start_of(index) != "teacher":
            raise PlanError(
                f"{where}: it prunes or cuts layers after stage {quantized_by.name} trained for int8 (`qat`), which "
                "would undo the learned scales; move the `qat` stage after it"
            )
        if stage.keep_mask:
            previous = plan.stages[index - 1] if index and plan.start_of(index) != "teacher" else None
            options = previous.callback_options("PruningScheduler") if previous else None
            if not options or options.get("structure", "unstructured") != "unstructured":
                raise PlanError(
                    f"{where}: `keep_mask` holds the previous stage's unstructured sparsity, but "
                    f"{'the stage before it' if previous else 'it starts from the teacher and'} adds no unstructured "
                    "PruningScheduler; remove `keep_mask` or put it after a pruning stage"
                )
            if prunes:
                raise PlanError(f"{where}: `keep_mask` and its own PruningScheduler; keep one of them")
        structure = (stage.callback_options("PruningScheduler") or {}).get("structure", "unstructured")
        if stage.shrink and structure == "unstructured":
            raise PlanError(
                f"{where}: `shrink` cuts structurally pruned heads and neurons out, but the stage adds no "
                "PruningScheduler with a `structure`; remove `shrink` or prune structurally"
            )
        later_starts = [i for i in range(index + 1, len(plan.stages)) if plan.start_of(i) == stage.name]
        if stage.shrink and structure != "neurons" and later_starts:
            raise PlanError(
                f"{where}: `shrink` cuts attention heads, and stage {plan.stages[later_starts[0]].name} would train "
                "from that model, which the task modules cannot load yet; shrink in the last stage, or prune "
                "`structure: neurons` only"
            )
        if stage.student_layers and index and plan.start_of(index) != "teacher" and pruned_by is not None:
            raise PlanError(
                f"{where}: `student_layers` cuts layers out of stage {pruned_by.name}'s pruned model; cut the student "
                "first, or start it from the teacher (`start: teacher`)"
            )
        if stage.callback_options("OpenVINOQuantizationAwareTraining") is not None:
            raise PlanError(
                f"{where}: its overlay adds OpenVINOQuantizationAwareTraining; use the stage key `openvino_qat` "
                "(its options as a mapping) so that the stage's export and final/ carry the trained int8 scales"
            )
        if stage.openvino_qat is not None:
            _check_openvino_qat(plan, index, quantized_by)
        if prunes or stage.keep_mask:
            pruned_by = stage
        if stage.qat is not None:
            quantized_by = stage
    if plan.final.sparse and plan.final.format != "transformers":
        raise PlanError(
            f"plan {plan.name}, final: `sparse` packs pruned weights in a transformers (or its int8) folder; an "
            f"{plan.final.format} graph holds dense weights. Set `format: transformers` or remove `sparse`"
        )


def _check_openvino_qat(plan: Plan, index: int, quantized_by: Stage | None) -> None:
    """An ``openvino_qat`` stage hands NNCF's quantized model to the final int8 graph and to nothing else."""
    stage = plan.stages[index]
    where = f"plan {plan.name}, stage {stage.name}"
    if index != len(plan.stages) - 1:
        raise PlanError(
            f"{where}: `openvino_qat` trains NNCF's quantized model, which no later stage can start from; make it the "
            "last stage"
        )
    if stage.shrink:
        raise PlanError(
            f"{where}: `shrink` would cut units out of NNCF's quantized model; prune and shrink in an earlier stage"
        )
    if quantized_by is not None and plan.start_of(index) != "teacher":
        raise PlanError(
            f"{where}: `openvino_qat` quantizes again what stage {quantized_by.name} trained with `qat`, whose scales "
            "would be lost; keep one of the two"
        )
    final = plan.final
    if not final.int8 or final.format not in ("openvino", "onnx"):
        raise PlanError(
            f"{where}: `openvino_qat`'s learned scales reach only an int8 OpenVINO or ONNX graph; set "
            "`final: {format: openvino, int8: true}` (or format onnx)"
        )
    if final.embedding_bits != 8:
        raise PlanError(
            f"plan {plan.name}, final: `embedding_bits` recompresses the embeddings of a post-training int8 export, "
            f"but stage {stage.name} trains NNCF's int8 embeddings with `openvino_qat`; remove `embedding_bits`"
        )
    if final.trim_vocabulary:
        raise PlanError(
            f"plan {plan.name}, final: `trim_vocabulary` would rebuild the embeddings after stage {stage.name} trained "
            "its int8 scales; remove it, or quantize after training with `final: {int8: true}` instead of `openvino_qat`"
        )


def parse_plan(raw: Any, name: str = "plan") -> Plan:
    """A :class:`Plan` from the mapping a YAML plan holds; :class:`PlanError` names what is wrong."""
    if not isinstance(raw, dict):
        raise PlanError(f"{name}: a plan is a mapping with `stages`, got {type(raw).__name__}")
    _check_keys(raw, {"name", "stages", "kd", "final"}, f"plan {name}")
    name = str(raw.get("name") or name)
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PlanError(f"plan {name}: `stages` is a non-empty list of stages")
    parsed = tuple(_stage(stage, index, name) for index, stage in enumerate(stages))
    seen: set[str] = set()
    for stage in parsed:
        if stage.name in seen:
            raise PlanError(f"plan {name}: two stages are named {stage.name!r}; stage names must be unique")
        seen.add(stage.name)
    kd = raw.get("kd") or {}
    if not isinstance(kd, dict) or "teacher" in kd:
        raise PlanError(
            f"plan {name}: `kd` is a mapping of KnowledgeDistillation options without `teacher` (--teacher)"
        )
    final_raw = raw.get("final") or {}
    if not isinstance(final_raw, dict):
        raise PlanError(f"plan {name}: `final` is a mapping of {[f.name for f in fields(FinalExport)]}")
    _check_keys(final_raw, {f.name for f in fields(FinalExport)}, f"plan {name}, final")
    if final_raw.get("format", "transformers") not in FORMATS:
        raise PlanError(f"plan {name}, final: `format` is one of {list(FORMATS)}, got {final_raw['format']!r}")
    keep = final_raw.get("keep_words", [])
    if not isinstance(keep, list) or not all(isinstance(word, str) for word in keep):
        raise PlanError(f"plan {name}, final: `keep_words` is a list of words to keep in the vocabulary, got {keep!r}")
    first = final_raw.get("keep_first_pieces", 0)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise PlanError(f"plan {name}, final: `keep_first_pieces` is a number of word pieces (>= 0), got {first!r}")
    bits = final_raw.get("embedding_bits", 8)
    if bits not in (8, 4) or isinstance(bits, bool):
        raise PlanError(f"plan {name}, final: `embedding_bits` is 8 or 4, got {bits!r}")
    if bits == 4 and not (final_raw.get("format") == "openvino" and final_raw.get("int8")):
        raise PlanError(
            f"plan {name}, final: `embedding_bits: 4` compresses the embeddings of an OpenVINO int8 artefact; set "
            "`format: openvino` and `int8: true`, or remove `embedding_bits`"
        )
    for option, given in (("keep_words", keep), ("keep_first_pieces", first)):
        if given and not final_raw.get("trim_vocabulary"):
            raise PlanError(f"plan {name}, final: `{option}` only matters with `trim_vocabulary: true`")
    plan = Plan(name, parsed, dict(kd), FinalExport(**{**final_raw, "keep_words": tuple(keep)}))
    _check_order(plan)
    return plan


def read_plan(path: str | Path) -> Plan:
    """Read and check a YAML plan file (plain data only: ``yaml.safe_load``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--plan {path}: no such file; the shipped plans are in recipes/compress/")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise PlanError(f"--plan {path}: not valid YAML ({error})") from None
    return parse_plan(raw, name=path.stem)
