"""``memopt report D``: a Markdown page with plots of a compression run, from ``D/compress.json`` and the logs.

It reads only what ``memopt compress`` wrote (``compress.json``, each stage's ``logs/*/metrics.csv`` and
exported weights), so it can be rerun on a finished or half-finished run. Needs matplotlib
(``pip install 'lightning-memopt[plots]'``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning_memopt.compress.runner import load_state

REPORT = "report.md"


def logged_rows(stage_folder: Path) -> list[dict[str, float]]:
    """The numeric rows of a stage's CSV logs, oldest version first (a resumed stage has several)."""
    versions = sorted(
        (stage_folder / "logs").glob("*/metrics.csv"), key=lambda p: int(p.parent.name.rsplit("_", 1)[-1] or 0)
    )
    rows: list[dict[str, float]] = []
    for path in versions:
        with path.open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                values = {key: float(value) for key, value in row.items() if value not in ("", None)}
                if "step" in values:
                    rows.append(values)
    return rows


def series(rows: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row that logged ``key``, the last value per step kept."""
    by_step = {int(row["step"]): row[key] for row in rows if key in row}
    return sorted(by_step.items())


def layer_sparsity(export: Path) -> dict[str, float]:
    """Share of zeros in each 2-D non-embedding weight of a model folder's ``model.safetensors``."""
    from safetensors import safe_open

    shares: dict[str, float] = {}
    path = export / "model.safetensors"
    if not path.exists():
        return shares
    with safe_open(str(path), "pt") as weights:
        for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if name.endswith(".weight") and "embeddings" not in name:
                tensor = weights.get_tensor(name)
                if tensor.dim() == 2:
                    shares[name.removesuffix(".weight")] = float((tensor == 0).float().mean())
    return shares


def kept_units(export: Path) -> dict[int, tuple[int, int]]:
    """Per encoder layer, the attention heads and feed-forward neurons a (shrunk) BERT-style export keeps."""
    import json
    import re

    from safetensors import safe_open

    path, config_path = export / "model.safetensors", export / "config.json"
    if not path.exists() or not config_path.exists():
        return {}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    head_size = config["hidden_size"] // config["num_attention_heads"]
    pattern = re.compile(r"layer\.(\d+)\.(attention\.self\.query|intermediate\.dense)\.weight$")
    found: dict[int, dict[str, int]] = {}
    with safe_open(str(path), "pt") as weights:
        for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if match := pattern.search(name):
                rows = int(weights.get_slice(name).get_shape()[0])
                found.setdefault(int(match.group(1)), {})[match.group(2)] = rows
    return {
        layer: (units.get("attention.self.query", 0) // head_size, units.get("intermediate.dense", 0))
        for layer, units in sorted(found.items())
    }


def plot_units(units: dict[int, tuple[int, int]], path: Path, stage: str) -> Path:
    """Attention heads and feed-forward neurons kept in each layer."""
    plt = _pyplot()
    figure, (heads, neurons) = plt.subplots(1, 2, figsize=(10, 3.5))
    layers = [str(layer) for layer in units]
    heads.bar(layers, [kept[0] for kept in units.values()], color="C0")
    neurons.bar(layers, [kept[1] for kept in units.values()], color="C1")
    heads.set(xlabel="layer", ylabel="attention heads kept")
    neurons.set(xlabel="layer", ylabel="feed-forward neurons kept")
    figure.suptitle(f"Structure after stage {stage}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("memopt report draws with matplotlib: pip install 'lightning-memopt[plots]'.") from None
    return plt


def tradeoff_points(state: dict[str, Any]) -> list[tuple[str, float, float | None, float]]:
    """``(name, MiB, ms at 8 x 128 or None, metric)`` for the teacher, each stage and final/.

    final/ is drawn at its own validation metric (scored on its runtime) when ``compress.json`` has it, else at its
    last stage's (runs from before final/ was scored).
    """
    latency = (state.get("latency_ms") or {}).get("8x128", {})
    points = []
    records = {"teacher": state.get("teacher_figures", {}), **state.get("stages", {})}
    for name, record in records.items():
        if "final" in record and "weights_bytes" in record:
            points.append((name, record["weights_bytes"] / 2**20, latency.get(name), record["final"]))
    final = state.get("final", {})
    if final.get("weights_bytes") and points:
        metric = final.get("metric", {}).get("value", points[-1][3])
        points.append(("final/", final["weights_bytes"] / 2**20, latency.get("final"), metric))
    return points


def plot_tradeoff(state: dict[str, Any], path: Path) -> Path:
    """Metric against weights on disk and against CPU latency, for the teacher, each stage and final/."""
    plt = _pyplot()
    points = tradeoff_points(state)
    timed = [p for p in points if p[2] is not None]
    figure, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 6.5, 4.5), squeeze=False)
    metric = next((r.get("monitor") for r in state.get("stages", {}).values() if r.get("monitor")), "metric")
    panels = [(axes[0][0], points, 1, "weights on disk (MiB)")]
    if timed:
        panels.append((axes[0][1], timed, 2, "CPU latency, batch 8 x 128, 2 threads (ms)"))
    for axis, shown, column, label in panels:
        for index, point in enumerate(shown):
            axis.scatter(point[column], point[3], s=40, color=f"C{index}")
            axis.annotate(point[0], (point[column], point[3]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        axis.set(xlabel=label, ylabel=f"{metric} (validation)")
        axis.grid(alpha=0.3)
    scored = "metric" in state.get("final", {})
    figure.suptitle("Trade-off" + ("" if scored else " (final/ drawn at its last stage's metric)"))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_stages(output_dir: Path, state: dict[str, Any], path: Path) -> Path:
    """The monitored metric and the sparsity over the whole plan, stages one after another."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    offset = 0
    metric = "metric"
    for index, (name, record) in enumerate(state.get("stages", {}).items()):
        rows = logged_rows(output_dir / name)
        metric = record.get("monitor", metric)
        scores = series(rows, metric)
        sparsity = series(rows, "sparsity")
        if scores:
            top.plot([offset + s for s, _ in scores], [v for _, v in scores], f"C{index}o-", ms=3, label=name)
        if sparsity:
            bottom.plot([offset + s for s, _ in sparsity], [v for _, v in sparsity], f"C{index}.-", label=name)
        top.axvline(offset, color="grey", lw=0.5)
        offset += int(record.get("steps", 0))
    top.set(ylabel=metric, title="Validation metric and sparsity, stage after stage")
    bottom.set(xlabel="optimizer steps (all stages)", ylabel="sparsity", ylim=(0, 1))
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_layers(shares: dict[str, float], path: Path, stage: str) -> Path:
    """Each layer's share of zero weights in the last stage's export."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, max(3.0, 0.18 * len(shares))))
    axis.barh(range(len(shares)), list(shares.values()))
    axis.set_yticks(range(len(shares)), list(shares), fontsize=6)
    axis.invert_yaxis()
    axis.set(xlabel="fraction of zero weights", xlim=(0, 1), title=f"Sparsity per layer after stage {stage}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


PARAMS, SPARSITY = "params", "linear_sparsity"


def stage_rows(state: dict[str, Any]) -> list[str]:
    """Markdown rows: teacher and each stage with metric, retention, parameters, sparsity, size, steps, time."""
    teacher = state.get("teacher_figures", {})
    reference = teacher.get("final")
    lines = [
        "| model | from | steps | metric | retention | params | Linear sparsity | weights (MiB) | ms, 8 x 128 "
        "| train seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    latency = (state.get("latency_ms") or {}).get("8x128", {})

    def row(name: str, record: dict[str, Any], key: str) -> str:
        score = record.get("final")
        retention = f"{score / reference:.3f}" if score is not None and reference else ""
        return (
            f"| {name} | {record.get('start', '')} | {record.get('steps', '')} | "
            f"{'' if score is None else f'{score:.4f}'} | {retention} | "
            f"{f'{record[PARAMS]:,}' if PARAMS in record else ''} | "
            f"{f'{record[SPARSITY]:.0%}' if SPARSITY in record else ''} | {record.get('weights_bytes', 0) / 2**20:.1f} | "
            f"{latency.get(key, '')} | {record.get('seconds', '')} |"
        )

    if teacher:
        lines.append(row("teacher", teacher, "teacher"))
    for name, record in state.get("stages", {}).items():
        lines.append(row(f"{name} ({record.get('state')})", record, name))
    final = state.get("final")
    if final:
        lines.append(
            row(f"final/ ({final['format']})", {"final": final.get("metric", {}).get("value"), **final}, "final")
        )
    return lines


def _is_shrink(state: dict[str, Any], name: str) -> bool:
    return any(stage.get("name") == name and stage.get("shrink") for stage in state.get("plan", {}).get("stages", []))


def write_report(output_dir: str | Path) -> Path:
    """Write ``D/report.md`` and its PNGs; return the page's path."""
    output_dir = Path(output_dir)
    state = load_state(output_dir)
    if not state:
        raise FileNotFoundError(f"{output_dir} holds no compress.json; run memopt compress --output_dir {output_dir}")
    plan = state.get("plan", {})
    lines = [
        f"# Compression report: plan {plan.get('name')}",
        "",
        f"Command: `{state.get('command', '')}`",
        "",
        f"Teacher: `{state.get('teacher')}`. Metrics are the validation scores at each stage's last step; "
        "retention is a stage's score over the teacher's; sizes are the float32 stage exports "
        "(`D/<stage>/export`) and the shipped `D/final/`; latency is the median of interleaved calls at the end "
        "of the run (stages on torch, final/ on its own runtime).",
        "",
        *stage_rows(state),
        "",
        f"![trade-off]({plot_tradeoff(state, output_dir / 'tradeoff.png').name})",
        "",
        f"![stages]({plot_stages(output_dir, state, output_dir / 'stages.png').name})",
        "",
    ]
    done = [name for name, record in state.get("stages", {}).items() if record.get("state") == "done"]
    shares = layer_sparsity(output_dir / done[-1] / "export") if done else {}
    if shares and max(shares.values()) > 0:
        lines += [f"![layers]({plot_layers(shares, output_dir / 'layers.png', done[-1]).name})", ""]
    shrunk = [name for name in done if _is_shrink(state, name)]
    units = kept_units(output_dir / shrunk[-1] / "export") if shrunk else {}
    if units:
        lines += [f"![units]({plot_units(units, output_dir / 'units.png', shrunk[-1]).name})", ""]
    page = output_dir / REPORT
    page.write_text("\n".join(lines), encoding="utf-8")
    return page
