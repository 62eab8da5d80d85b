"""Benchmark variants are recipe overlays in recipes/benchmarks/: each parses with `memopt fit`, runs after
the variants whose runs it reads, and a malformed one fails with a message naming the file and the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from helpers import NER, PROJECT_ROOT, RECIPES

from lightning_memopt.cli import run_cli

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
from variants import Variant, check_order, fill, load_variants, read_variant

VARIANT_FILES = sorted((RECIPES / "benchmarks").glob("*/*.yaml"))


def test_the_pruning_quantization_and_distillation_benchmarks_have_variant_files() -> None:
    assert {path.parent.name for path in VARIANT_FILES} == {"pruning", "quantization", "distillation"}
    assert len(load_variants("pruning")) == 19


@pytest.mark.parametrize("path", VARIANT_FILES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_variant_is_an_overlay_memopt_fit_accepts(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    variant = read_variant(path)
    overlay = variant.config_file(tmp_path, runs=str(tmp_path / "runs"), teacher=str(tmp_path / "teacher.ckpt"))
    monkeypatch.setattr(sys, "argv", ["memopt"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *NER, "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    classes = [callback["class_path"] for callback in printed["trainer"]["callbacks"]]
    for callback in variant.overlay.get("trainer", {}).get("callbacks+", []):
        assert callback["class_path"] in classes  # added to the recipe's own callbacks, not replacing them
    assert "lightning.pytorch.callbacks.LearningRateMonitor" in classes
    if "{runs}/" in path.read_text():
        assert str(tmp_path / "runs") in yaml.safe_dump(printed)


def test_a_variant_runs_after_the_variants_whose_runs_it_reads(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "a-pruned.yaml").write_text(
        "model: {init_args: {model_name_or_path: '{runs}/z-dense/export'}}"
    )
    (tmp_path / "demo" / "b-rewound.yaml").write_text("model: {init_args: {model_name_or_path: '{runs}/a-pruned/x'}}")
    (tmp_path / "demo" / "z-dense.yaml").write_text("{}")
    variants = load_variants("demo", root=tmp_path)
    assert list(variants) == ["z-dense", "a-pruned", "b-rewound"]
    assert check_order(variants, ["z-dense", "a-pruned", "b-rewound"]) is None
    assert check_order(variants, ["z-dense", "b-rewound", "a-pruned"]) == (
        "b-rewound reads a-pruned's run; list a-pruned before it"
    )


def test_variants_that_read_each_other_in_a_cycle_are_refused(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "a.yaml").write_text("x: '{runs}/b/export'")
    (tmp_path / "demo" / "b.yaml").write_text("x: '{runs}/a/export'")
    with pytest.raises(ValueError, match="in a cycle: a -> b -> a"):
        load_variants("demo", root=tmp_path)


def test_an_unknown_benchmark_key_or_placeholder_is_named(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text("benchmark: {budget: 3, steps: 10}\n")
    with pytest.raises(
        ValueError, match=r"v.yaml: unknown benchmark key\(s\) \['steps'\]; known: \['budget', 'label'\]"
    ):
        read_variant(path)
    with pytest.raises(ValueError, match=r"variant v: unknown placeholder \{teacher\}; known: \['runs'\]"):
        fill({"a": ["{teacher}/last.ckpt"]}, {"runs": "/r"}, where="v")
    assert fill({"a": ["{runs}/x", 3]}, {"runs": "/r"}, where="v") == {"a": ["/r/x", 3]}


def test_budget_label_and_callback_options_come_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "qat-late.yaml"
    path.write_text(
        "benchmark: {budget: 3, label: late}\n"
        "trainer: {callbacks+: [{class_path: lightning_memopt.QuantizationAwareTraining, init_args: {start: 0.5}}]}\n"
    )
    variant = read_variant(path)
    assert (variant.name, variant.budget, variant.label) == ("qat-late", 3, "late")
    assert variant.options("QuantizationAwareTraining") == {"start": 0.5}
    assert variant.options("PruningScheduler") is None
    assert "benchmark" not in yaml.safe_load(variant.config_file(tmp_path / "run").read_text())
    assert Variant("dense").config_file(tmp_path / "dense").read_text() == "{}\n"


def test_the_compress_page_checks_each_plan_against_its_aims() -> None:
    from compress import render

    def result(score: float, size: float, speed: float, vs_int8: float, cost: float | None = None) -> dict:
        figures = {"score": score, "retention": round(score / 0.9, 4), "size_ratio": size, "weights_bytes": size * 9e7,
                   "latency_ms": {"8x128": 100 / speed}, "speedup": {"8x128": speed, "1x128": speed},
                   "speedup_vs_dense_int8": {"8x128": vs_int8, "1x128": vs_int8}}  # fmt: skip
        return figures | ({"cost": cost} if cost is not None else {})

    payload = {
        "command": "python benchmarks/compress.py",
        "machine": "m",
        "cpu_flags": ["avx512_vnni"],
        "date": "d",
        "teacher": "t",
        "task": "ner",
        "budget": 600,
        "results": {
            "dense": result(0.9, 1.0, 1.0, 0.3),
            "dense OpenVINO int8": result(0.897, 0.25, 3.1, 1.0),
            "ner-sparse": result(0.8955, 0.2, 3.0, 0.97, cost=3.0),
        },
    }
    page = "\n".join(render(payload))
    assert "| ner-sparse | ner-sparse: retention >= 0.99 | 0.995 | yes |" in page
    assert "| ner-sparse | oBERT-class, any NER plan: size_ratio <= 0.1 | 0.2 | no |" in page
    assert "| ner-sparse | oBERT-class, any NER plan: cost <= 4.0 | 3.0 | yes |" in page
    assert "| dense |" in page and "| dense | oBERT" not in page  # baselines are not held to the aims
    assert "CPU flags: avx512_vnni" in page and page.startswith("# memopt compress, CoNLL-2003 NER: 600 steps")
