"""A PNG of a pruning run: the planned schedule, the sparsity reached, and each layer's final sparsity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning_memopt.pruning.schedules import ResolvedSchedule, sparsity_at


def plot_pruning(
    path: str | Path,
    schedule: ResolvedSchedule,
    history: Sequence[tuple[int, float]],
    layer_sparsities: Mapping[str, float],
) -> Path:
    """Write the two-panel figure to ``path`` (needs matplotlib: ``pip install 'lightning-memopt[plots]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plotting needs matplotlib: pip install 'lightning-memopt[plots]'.") from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    steps = list(range(schedule.total_steps + 1))
    left.plot(
        steps, [sparsity_at(s, schedule) for s in steps], drawstyle="steps-post", label=f"{schedule.kind} schedule"
    )
    if history:
        left.step([s for s, _ in history], [v for _, v in history], where="post", marker="o", ms=3, label="applied")
    left.set(xlabel="optimizer step", ylabel="sparsity", ylim=(0, 1), title="Sparsity over the run")
    left.legend()
    names = [name.removesuffix(".weight") for name in layer_sparsities]
    right.barh(range(len(names)), list(layer_sparsities.values()))
    right.set_yticks(range(len(names)), names, fontsize=6)
    right.invert_yaxis()
    right.set(xlabel="fraction of zero weights", xlim=(0, 1), title="Final sparsity per layer")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
