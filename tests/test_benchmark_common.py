"""The benchmark scripts' shared bookkeeping: rerunning one part or task keeps the others' figures and notes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import (
    RESUME_MARKER,
    budget_words,
    carry_over,
    exact_final,
    load_results,
    prepare_run_folder,
    report_header,
    save_results,
    step_budget,
    validation_history,
)


def test_a_partial_rerun_keeps_earlier_parts_and_tasks_with_their_origin(tmp_path: Path) -> None:
    first = {"command": "run 1", "date": "d1", "accuracy": {"ner": 0.8, "sst2": 0.9}, "overhead": {"ratio": 1.1}}
    (tmp_path / "pruning-600.json").write_text(json.dumps(first))

    second = {"command": "run 2", "date": "d2", "accuracy": {"ner": 0.85}}
    carry_over("pruning", 600, second, ["accuracy", "overhead"], results=tmp_path)
    assert second["accuracy"] == {"ner": 0.85, "sst2": 0.9}
    assert second["overhead"] == {"ratio": 1.1}
    assert second["carried_over"] == {
        "overhead": {"command": "run 1", "date": "d1"},
        "accuracy.sst2": {"command": "run 1", "date": "d1"},
    }
    (tmp_path / "pruning-600.json").write_text(json.dumps(second))

    third = {"command": "run 3", "date": "d3", "accuracy": {"ner": 0.86, "sst2": 0.91}}
    carry_over("pruning", 600, third, ["accuracy", "overhead"], results=tmp_path)
    assert third["carried_over"] == {"overhead": {"command": "run 1", "date": "d1"}}  # the first origin, not run 2
    assert "- `overhead` kept from an earlier run: `run 1` (d1)" in report_header("t", {**third, "machine": "m"})


def test_nothing_saved_or_nothing_missing_adds_no_origin(tmp_path: Path) -> None:
    payload = {"command": "run", "date": "d", "accuracy": {"ner": 0.8}}
    carry_over("quantization", 600, payload, ["accuracy"], results=tmp_path)
    assert "carried_over" not in payload
    (tmp_path / "quantization-600.json").write_text(json.dumps(payload))
    again = {"command": "run", "date": "d", "accuracy": {"ner": 0.7}}
    carry_over("quantization", 600, again, ["accuracy"], results=tmp_path)
    assert again == {"command": "run", "date": "d", "accuracy": {"ner": 0.7}}


def test_a_regenerated_page_keeps_its_hand_written_notes(tmp_path: Path) -> None:
    pages, results = tmp_path / "pages", tmp_path / "results"
    (pages / "notes").mkdir(parents=True)
    (pages / "notes" / "pruning-600.md").write_text("Notes: the aim was missed at 80 %.\n")
    for score in ("0.80", "0.85"):
        page = save_results("pruning", 600, {"f1": score}, ["# Pruning", f"f1 {score}", ""], results, pages)
    assert page.read_text() == "# Pruning\nf1 0.85\n\nNotes: the aim was missed at 80 %.\n"
    assert json.loads((results / "pruning-600.json").read_text()) == {"f1": "0.85"}
    assert save_results("distillation", 600, {}, ["# KD", ""], results, pages).read_text() == "# KD\n"


def test_render_reads_back_what_was_saved_and_names_the_budget_when_nothing_was(tmp_path: Path) -> None:
    payload = {"command": "run", "tasks": {"ner": {"fp32": {"final": 0.9}}}}
    save_results("quantization", 0, payload, ["# Q", ""], tmp_path, tmp_path / "pages")
    assert load_results("quantization", 0, tmp_path) == payload
    with pytest.raises(SystemExit, match=re.escape("quantization-600.json; run the benchmark with --steps 600 first")):
        load_results("quantization", 600, tmp_path)


def test_the_seed_table_gives_each_models_mean_and_its_gap_to_fp32_of_the_same_seed() -> None:
    from quantization import seed_table

    def scores(fp32: float, ptq: float) -> dict:
        return {"fp32": {"final": fp32}, "ptq": {"final": ptq}}

    lines = seed_table("sst2", {"42": scores(0.86, 0.85), "7": scores(0.88, 0.885), "13": {}})
    assert lines[2] == "| model | seed 42 | seed 7 | mean | Δ vs fp32, mean [min, max] |"  # seed 13 has no runs
    assert lines[4] == "| fp32 | 0.8600 | 0.8800 | 0.8700 |  |"
    assert lines[5] == "| post-training int8 | 0.8500 | 0.8850 | 0.8675 | -0.25 [-1.00, +0.50] |"
    assert len(lines) == 7  # no QAT rows: no seed has them


def test_tasks_keep_their_saved_order_when_some_are_rerun(tmp_path: Path) -> None:
    saved = {"command": "run 1", "date": "d1", "tasks": {name: {"run": 1} for name in "abcdefgh"}}
    (tmp_path / "quantization-full.json").write_text(json.dumps(saved))
    payload: dict = {"command": "run 2", "date": "d2", "tasks": {"z": {"run": 2}, "f": {"run": 2}}}
    carry_over("quantization", 0, payload, ["tasks"], results=tmp_path)  # steps 0: the recipes' own length
    assert list(payload["tasks"]) == [*"abcdefgh", "z"]  # a rerun task stays in place, a new one goes last
    assert payload["tasks"]["f"] == {"run": 2} and payload["tasks"]["a"] == {"run": 1}
    assert "tasks.f" not in payload["carried_over"] and payload["carried_over"]["tasks.a"]["command"] == "run 1"


def test_rerunning_some_variants_keeps_the_others_rows_with_their_origin_and_machine(tmp_path: Path) -> None:
    def rows(run: int, *names: str) -> list[dict]:
        return [{"variant": name, "final": run} for name in names]

    saved = {"command": "run 1", "date": "d1", "machine": "epyc", "accuracy": {"ner": rows(1, "dense", "a", "b")}}
    (tmp_path / "pruning-full.json").write_text(json.dumps(saved))
    payload: dict = {"command": "run 2", "date": "d2", "machine": "xeon", "accuracy": {"ner": rows(2, "dense", "c")}}
    carry_over("pruning", 0, payload, ["accuracy"], results=tmp_path)
    assert payload["accuracy"]["ner"] == [*rows(2, "dense"), *rows(1, "a", "b"), *rows(2, "c")]
    assert payload["carried_over"] == {
        f"accuracy.ner.{name}": {"command": "run 1", "date": "d1", "machine": "epyc"} for name in ("a", "b")
    }
    header = report_header("t", payload)
    assert "- `accuracy.ner.a`, `accuracy.ner.b` kept from an earlier run: `run 1` (d1, epyc)" in header


def test_page_titles_name_a_step_budget_or_the_recipes_own_length() -> None:
    assert budget_words(600) == "600 optimizer steps"
    assert budget_words(0) == "full recipe length"  # --steps 0, not "0 optimizer steps"


def test_a_longer_budget_multiplies_steps_or_the_recipes_own_epochs() -> None:
    assert step_budget(600, times=3)[:2] == ["--trainer.max_steps=1800", "--trainer.val_check_interval=1800"]
    assert step_budget(0) == [] and step_budget(0, seed=7) == ["--seed_everything=7"]
    # the recipe's length: CoNLL-2003 runs 3 epochs, SST-2 1 (its offline overlay overrides the 3 of sst2.yaml)
    assert step_budget(0, task="ner", times=3) == ["--trainer.max_epochs=9"]
    assert step_budget(0, task="sst2", times=3) == ["--trainer.max_epochs=3"]
    with pytest.raises(ValueError, match="name the task"):
        step_budget(0, times=3)


def test_an_interrupted_run_is_kept_to_resume_only_with_skip_done(tmp_path: Path) -> None:
    def run_folder(name: str, *files: str) -> Path:
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("x")
        return tmp_path / name

    interrupted = run_folder("interrupted", "checkpoints/last.ckpt")
    assert prepare_run_folder(interrupted, skip_done=True) == interrupted / "checkpoints/last.ckpt"
    assert (interrupted / RESUME_MARKER).exists()
    assert prepare_run_folder(interrupted, skip_done=False) is None and not interrupted.exists()
    never_checkpointed = run_folder("early", "logs/version_0/metrics.csv")
    assert prepare_run_folder(never_checkpointed, skip_done=True) is None and not never_checkpointed.exists()


def test_a_resumed_runs_history_joins_its_log_versions_in_order_once_per_step(tmp_path: Path) -> None:
    for version, rows in ((0, ["3,0.5", "5,"]), (2, ["7,0.7"]), (10, ["7,0.75", "9,0.9"])):
        folder = tmp_path / "logs" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text("\n".join(["step,val_f1", *rows]) + "\n")
    history = validation_history(tmp_path / "logs" / "version_10", "val_f1")
    # version_10 resumed from a checkpoint before step 8 and validated there again: its value replaces the first
    assert history == [{"step": 4, "val_f1": 0.5}, {"step": 8, "val_f1": 0.75}, {"step": 10, "val_f1": 0.9}]


def test_a_delta_against_dense_uses_the_unrounded_last_validation() -> None:
    # 0.897024 against 0.906953 is -0.99 points; the rounded finals (0.8970, 0.9070) would say -1.00
    dense = {
        "metric": "val_f1",
        "final": 0.907,
        "history": [{"step": 5, "val_f1": 0.9}, {"step": 9, "val_f1": 0.906953}],
    }
    pruned = {"metric": "val_f1", "final": 0.897, "history": [{"step": 9, "val_f1": 0.897024}]}
    assert f"{100 * (exact_final(pruned) - exact_final(dense)):+.2f}" == "-0.99"
    assert exact_final({"metric": "accuracy", "final": 0.86}) == 0.86  # no history logged
