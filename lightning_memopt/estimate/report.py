"""Per-device peak training memory of a ``memopt fit`` config, as the table ``memopt estimate`` prints.

Reads the same configs as ``memopt fit`` (nothing is instantiated and no weights are read: only the
model's ``config.json``), simulates one training step on the meta device, and prints a table of the
per-device peak under each strategy and device count, the breakdown for the configured setting, and,
given ``--device_memory``, the cheapest setting that fits.

    memopt estimate --config recipes/ner/conll2003.yaml --trainer.devices 2 --device_memory 16GiB
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_memopt.distributed import ZERO_DEFAULT_BUCKET as DEFAULT_BUCKET
from lightning_memopt.estimate.simulation import StepSimulation, Task, simulate_step
from lightning_memopt.estimate.strategies import Strategy, device_peak

MIB = 2**20
LIGHTNING_DEEPSPEED_BUCKET = 200_000_000  # DeepSpeedStrategy's reduce_bucket_size
TASKS: dict[str, Task] = {
    "TokenClassificationModule": "token-classification",
    "SequenceClassificationModule": "sequence-classification",
    "CausalLMModule": "causal-lm",
}
PRECISIONS = {"32-true": torch.float32, "32": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
MIXED = ("bf16-mixed", "16-mixed", "bf16", "16")
# Settings in the order of their cost (communication, recomputation): the first that fits is recommended.
SETTINGS: tuple[tuple[Strategy, bool], ...] = (
    ("ddp", False),
    ("zero1", False),
    ("zero2", False),
    ("fsdp2", False),
    ("zero3", False),
    ("fsdp2", True),
    ("zero3", True),
)
STRATEGY_NAMES: dict[str, Strategy] = {
    "ddp": "ddp",
    "ddp_spawn": "ddp",
    "ddp_fork": "ddp",
    "ddp_notebook": "ddp",
    "DDPStrategy": "ddp",
    "fsdp": "fsdp2",
    "FSDPStrategy": "fsdp2",
    "FSDP2Strategy": "fsdp2",
    "ModelParallelStrategy": "fsdp2",
    "deepspeed_stage_1": "zero1",
    "deepspeed_stage_2": "zero2",
    "deepspeed_stage_2_offload": "zero2",
    "deepspeed_stage_3": "zero3",
    "deepspeed_stage_3_offload": "zero3",
}
SIZE = re.compile(r"^\s*([0-9.]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
UNITS["tib"] = 2**40


def parse_size(text: str) -> int:
    """Bytes in a size such as ``16GiB``, ``80GB`` or ``512MiB`` (a bare number is GiB).

    >>> parse_size("16GiB"), parse_size("1.5 GB"), parse_size("2")
    (17179869184, 1500000000, 2147483648)
    """
    match = SIZE.match(text)
    if match is None:
        raise ValueError(f"--device_memory={text!r} is not a size; write e.g. 16GiB, 80GB or 24000MiB.")
    unit = (match.group(2) or "GiB").lower()
    return int(float(match.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class Setup:
    """What the estimate needs from a ``memopt fit`` config."""

    module: str
    model: str
    task: Task
    num_labels: int
    batch_size: int
    sequence_length: int
    devices: int
    strategy: Strategy
    activation_checkpointing: bool
    precision: str
    optimizer: str
    device: str = "cpu"
    zero_bucket: int = DEFAULT_BUCKET


def _name(value: Any) -> str:
    """A strategy's name as a config gives it: a string, or the class of a ``class_path`` entry."""
    if isinstance(value, str):
        return value
    class_path = getattr(value, "class_path", None) or type(value).__name__
    return class_path.rsplit(".", 1)[-1]


def _count(devices: Any, accelerator: Any) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1, None):
        return max(1, torch.cuda.device_count()) if accelerator in ("auto", "gpu", "cuda") else 1
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"--trainer.devices={devices!r}: give a positive count, a list of device ids or 'auto'.")
    return devices


def _device_type(accelerator: Any) -> str:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def setup_from_config(config: Any) -> Setup:
    """Pull model, batch, devices, strategy, precision and optimizer out of a parsed ``memopt fit`` config."""
    module = config.model.class_path.rsplit(".", 1)[-1]
    if module not in TASKS:
        raise ValueError(
            f"memopt estimate reads configs of {', '.join(TASKS)}; --model is {config.model.class_path}. "
            "For another LightningModule, call lightning_memopt.estimate.simulate_step with its model's config."
        )
    model_args, data_args, trainer = config.model.init_args, config.data.init_args, config.trainer
    labels = model_args.labels or getattr(data_args, "labels", None)
    strategy_name = _name(trainer.strategy)
    devices = _count(trainer.devices, trainer.accelerator) * int(trainer.num_nodes or 1)
    if strategy_name in ("auto", "single_device", "SingleDeviceStrategy"):
        strategy: Strategy = "single" if devices == 1 else "ddp"
    elif strategy_name in STRATEGY_NAMES:
        strategy = STRATEGY_NAMES[strategy_name]
    elif strategy_name in ("DeepSpeedStrategy", "ZeROStrategy"):
        strategy = f"zero{trainer.strategy.init_args.stage}"  # type: ignore[assignment]
    else:
        raise ValueError(
            f"memopt estimate does not know --trainer.strategy={strategy_name!r}; "
            f"it knows auto, {', '.join(STRATEGY_NAMES)}, DeepSpeedStrategy and ZeROStrategy."
        )
    init_args = getattr(trainer.strategy, "init_args", None)
    if strategy_name == "ZeROStrategy":
        bucket = int(init_args.bucket_size)
    elif strategy_name.startswith(("deepspeed", "DeepSpeed")):
        bucket = int(getattr(init_args, "reduce_bucket_size", LIGHTNING_DEEPSPEED_BUCKET))
    else:
        bucket = DEFAULT_BUCKET
    precision = str(trainer.precision or "32-true")
    if precision not in PRECISIONS and precision not in MIXED:
        raise ValueError(f"memopt estimate does not know --trainer.precision={precision!r}.")
    return Setup(
        module=module,
        model=model_args.model_name_or_path,
        task=TASKS[module],
        num_labels=len(labels) if labels else 2,
        batch_size=int(data_args.batch_size),
        sequence_length=int(data_args.max_length),
        devices=devices,
        strategy=strategy,
        activation_checkpointing=bool(getattr(init_args, "activation_checkpointing", False)),
        precision=precision,
        optimizer=model_args.optimizer,
        device=_device_type(trainer.accelerator),
        zero_bucket=bucket,
    )


def load_model_config(model: str, num_labels: int) -> Any:
    """The ``transformers`` config of ``model`` (no weights), or a clear error."""
    from transformers import AutoConfig

    from lightning_memopt.core.sources import resolve_pretrained

    try:
        return AutoConfig.from_pretrained(resolve_pretrained(model), num_labels=num_labels)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"memopt estimate cannot load the config of --model.model_name_or_path={model!r}: {error}"
        ) from None


ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def attention_dropout(config: Any) -> float:
    """The attention dropout a config trains with. Without it (decoder LMs, as a rule) PyTorch's CPU attention
    also runs a fused kernel that keeps no sequence x sequence probabilities, as CUDA always does."""
    return max((float(getattr(config, name)) for name in ATTENTION_DROPOUT if hasattr(config, name)), default=0.0)


def _peak(step: StepSimulation, setup: Setup, strategy: Strategy, devices: int) -> dict[str, int]:
    if devices == 1 and strategy == "ddp":
        strategy = "single"
    if strategy == "single" and devices > 1:
        strategy = "ddp"
    return device_peak(step, strategy, devices, setup.optimizer, setup.device, setup.zero_bucket)


def _label(strategy: Strategy, checkpointing: bool) -> str:
    name = "single / ddp" if strategy in ("single", "ddp") else strategy
    return f"{name} + checkpointing" if checkpointing else name


def estimate_report(setup: Setup, model_config: Any, device_memory: int | None = None) -> str:
    """The text ``memopt estimate`` prints."""
    dtype = PRECISIONS.get(setup.precision, torch.float32)
    steps = {
        ckpt: simulate_step(
            model_config,
            setup.task,
            setup.batch_size,
            setup.sequence_length,
            dtype=dtype,
            activation_checkpointing=ckpt,
            fused_attention=setup.device == "cuda" or not attention_dropout(model_config),
        )
        for ckpt in (False, True)
    }
    counts = sorted({1, 2, 4, 8, setup.devices})
    plain = steps[False]
    width, layers = getattr(model_config, "hidden_size", "?"), plain.blocks
    lines = [
        f"memopt estimate: {setup.module}({setup.model}), batch {setup.batch_size} x {setup.sequence_length} tokens "
        f"per device, precision {setup.precision}, optimizer {setup.optimizer}, {setup.devices} device(s) in all",
        f"Model: {sum(plain.trainable_numels):,} trainable parameters ({plain.parameters / MIB:,.1f} MiB), "
        f"{layers} transformer blocks of width {width}",
        f"Activations per device (batch x sequence x layers x width = {setup.batch_size} x {setup.sequence_length} x "
        f"{layers} x {width}): {plain.forward.activations / MIB:,.1f} MiB; with activation checkpointing "
        f"{steps[True].forward.activations / MIB:,.1f} MiB",
        "Attention: "
        + (
            "CUDA's fused kernel (no sequence x sequence tensors kept)"
            if setup.device == "cuda"
            else "the math path of the CPU (probabilities and dropout mask kept, sequence x sequence per head)"
        ),
    ]
    if setup.precision in MIXED:
        lines.append(
            f"Precision {setup.precision} is estimated as 32-true (an upper bound: autocast keeps some "
            "activations in 16 bits)."
        )
    header = f"{'Per-device peak (MiB)':<28}" + "".join(f"{f'{n} device' + ('s' if n > 1 else ''):>12}" for n in counts)
    lines += ["", header]
    for strategy, ckpt in SETTINGS:
        cells = "".join(f"{_peak(steps[ckpt], setup, strategy, n)['peak'] / MIB:>12,.0f}" for n in counts)
        lines.append(f"{_label(strategy, ckpt):<28}{cells}")
    mine = _peak(steps[setup.activation_checkpointing], setup, setup.strategy, setup.devices)
    dtype_name = str(dtype).removeprefix("torch.")
    state_name = f"optimizer state ({setup.optimizer}{'' if '8bit' in setup.optimizer else ', ' + dtype_name})"
    lines += [
        "",
        f"Your setting: {_label(setup.strategy, setup.activation_checkpointing)} on {setup.devices} device(s)",
    ]
    for part, size in mine.items():
        lines.append(f"  {state_name if part == 'optimizer' else part:<34}{size / MIB:>10,.1f} MiB")
    if device_memory is not None:
        lines += ["", recommend(steps, setup, device_memory, counts)]
    return "\n".join(lines)


def recommend(steps: dict[bool, StepSimulation], setup: Setup, device_memory: int, counts: Sequence[int]) -> str:
    """The cheapest setting that fits ``device_memory`` per device, first with the configured device count."""
    budget = f"{device_memory / 2**30:,.1f} GiB" if device_memory >= 2**30 else f"{device_memory / MIB:,.0f} MiB"
    for devices in [setup.devices, *(n for n in counts if n > setup.devices)]:
        for strategy, ckpt in SETTINGS:
            peak = _peak(steps[ckpt], setup, strategy, devices)["peak"]
            if peak <= device_memory:
                where = "as configured" if devices == setup.devices else f"with {devices} devices"
                return f"Cheapest setting that fits {budget} per device {where}: {_label(strategy, ckpt)} ({peak / MIB:,.0f} MiB)."
    per_sample = steps[True].forward.activations / setup.batch_size
    return (
        f"Nothing fits {budget} per device with up to {max(counts)} devices at batch {setup.batch_size}: lower "
        f"--data.batch_size and raise --trainer.accumulate_grad_batches (activations take about "
        f"{per_sample / MIB:,.1f} MiB per sequence with checkpointing), or use an 8-bit optimizer."
    )
