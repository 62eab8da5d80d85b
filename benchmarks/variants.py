"""Benchmark variants: recipe overlays in ``recipes/benchmarks/<benchmark>/<variant>.yaml``.

A variant file is an overlay for ``memopt fit``, like ``recipes/pruning/*.yaml``, with one extra mapping,
``benchmark:``, that only the benchmark scripts read:

- ``budget``: the run's length as a multiple of ``--steps`` (the schedule's fractions stretch with it);
- ``label``: how the results page names the variant (default: the file name).

Strings in the overlay may hold placeholders the script fills in: ``{runs}`` is the task's run folder, so
``model_name_or_path: "{runs}/dense/export"`` starts from the dense variant's export and
``teacher: "{runs}/dense/checkpoints/last.ckpt"`` distils from its checkpoint. A variant that names another
variant's folder this way runs after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VARIANTS_ROOT = Path(__file__).resolve().parents[1] / "recipes" / "benchmarks"
BENCHMARK_KEYS = {"budget", "label"}
PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Variant:
    """One benchmark run: its name, its ``memopt fit`` overlay and its length as a multiple of ``--steps``."""

    name: str
    overlay: dict[str, Any] = field(default_factory=dict)
    budget: int = 1
    label: str | None = None

    def options(self, class_name: str) -> dict[str, Any] | None:
        """The ``init_args`` of the overlay's callback named ``class_name``, or ``None`` if it adds none.

        ``Variant("x", {"trainer": {"callbacks+": [{"class_path": "a.B", "init_args": {"k": 1}}]}}).options("B")``
        is ``{"k": 1}``.
        """
        for callback in self.overlay.get("trainer", {}).get("callbacks+", []):
            if callback["class_path"].rsplit(".", 1)[-1] == class_name:
                return callback.get("init_args", {})
        return None

    def needs(self) -> set[str]:
        """The folders under ``{runs}`` this variant reads (other variants' runs, or folders the script makes)."""
        return set(re.findall(r"\{runs\}/([^/\"']+)", yaml.safe_dump(self.overlay)))

    def config_file(self, folder: Path, **values: str) -> Path:
        """Write the overlay with its placeholders filled in to ``folder/variant.yaml``, for ``--config``."""
        filled = fill(self.overlay, values, where=self.name)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "variant.yaml"
        path.write_text(yaml.safe_dump(filled, sort_keys=False))
        return path


def fill(value: Any, values: dict[str, str], where: str) -> Any:
    """``value`` with every ``{name}`` in its strings replaced by ``values[name]``; an unknown name is an error."""
    if isinstance(value, dict):
        return {key: fill(item, values, where) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, values, where) for item in value]
    if isinstance(value, str):

        def replace(match: re.Match) -> str:
            if match.group(1) not in values:
                raise ValueError(f"variant {where}: unknown placeholder {match.group(0)}; known: {sorted(values)}")
            return values[match.group(1)]

        return PLACEHOLDER.sub(replace, value)
    return value


def read_variant(path: Path) -> Variant:
    """Parse one variant file; a clear error for a ``benchmark:`` key the scripts do not know."""
    overlay = yaml.safe_load(path.read_text()) or {}
    settings = overlay.pop("benchmark", None) or {}
    unknown = set(settings) - BENCHMARK_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown benchmark key(s) {sorted(unknown)}; known: {sorted(BENCHMARK_KEYS)}")
    return Variant(path.stem, overlay, int(settings.get("budget", 1)), settings.get("label"))


def load_variants(benchmark: str, root: Path = VARIANTS_ROOT) -> dict[str, Variant]:
    """The variants of ``benchmark``, each after the variants whose runs it reads, otherwise by name."""
    files = sorted((root / benchmark).glob("*.yaml"), key=lambda path: path.stem)
    if not files:
        raise FileNotFoundError(f"no benchmark variants in {root / benchmark}")
    found = {variant.name: variant for variant in map(read_variant, files)}
    ordered: dict[str, Variant] = {}

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"benchmark variants read each other's runs in a cycle: {' -> '.join((*chain, name))}")
        if name in ordered:
            return
        for needed in sorted(found[name].needs() & set(found)):
            add(needed, (*chain, name))
        ordered[name] = found[name]

    for name in found:
        add(name, ())
    return ordered


def check_order(variants: dict[str, Variant], chosen: list[str]) -> str | None:
    """Why ``chosen`` cannot run in its order (a variant listed before a variant whose run it reads), or ``None``."""
    for index, name in enumerate(chosen):
        for needed in sorted(variants[name].needs() & set(variants)):
            if needed not in chosen[:index]:
                return f"{name} reads {needed}'s run; list {needed} before it"
    return None
