"""`memopt compress`: plans parse into checked stages, stages run in order as `memopt fit` processes, a rerun
skips finished stages and resumes an interrupted one to the same weights, and a changed plan is refused."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    DDP_TWO_CPUS,
    NER,
    RECIPES,
    SST2,
    memopt,
    memopt_command,
    run_together,
    save_tiny_bert,
    small_ner_args,
    subprocess_env,
    succeeded,
)
from safetensors.torch import load_file
from transformers import BertForTokenClassification

from lightning_memopt.compress import PlanError, parse_plan, read_plan
from lightning_memopt.compress.runner import check_resumable, check_teacher, stage_overlay

PRUNE_80 = {
    "class_path": "lightning_memopt.PruningScheduler",
    "init_args": {
        "final_sparsity": 0.8,
        "schedule": "cubic",
        "start": 0.0,
        "end": 0.7,
        "every": 0.01,
        "scope": "global",
    },
}
STRUCTURED = {
    "class_path": "lightning_memopt.PruningScheduler",
    "init_args": {"final_sparsity": 0.5, "structure": "heads"},
}


OPENVINO_INT8 = {"format": "openvino", "int8": True}


def prune_stage(name: str = "prune", callback: dict = PRUNE_80, **keys: object) -> dict:
    return {"name": name, "overlay": {"trainer": {"callbacks+": [callback]}}, **keys}


@pytest.mark.parametrize("path", sorted((RECIPES / "compress").glob("*.yaml")), ids=lambda path: path.stem)
def test_the_shipped_plans_parse(path: Path) -> None:
    plan = read_plan(path)
    assert plan.name == path.stem and plan.final.format == "openvino" and plan.final.int8
    assert plan.final.embedding_bits == 4 and not plan.final.trim_vocabulary  # every piece kept, rows in int4
    assert plan.kd == {"alpha": 0.5, "temperature": 2.0}
    if path.stem.endswith("-sparse"):
        assert [s.name for s in plan.stages] == ["prune", "rewind"] and plan.stages[1].keep_mask
    else:
        assert plan.stages[0].student_layers == (0, 2, 4)
    if path.stem.endswith("-tiny"):
        assert plan.stages[1].shrink and plan.start_of(1) == "student"


def test_the_readme_plan_parses() -> None:
    readme = (RECIPES.parent / "README.md").read_text()
    block = next(b for b in readme.split("```yaml")[1:] if b.lstrip().startswith("name: my-plan"))
    plan = parse_plan(yaml.safe_load(block.split("```")[0]), "readme")
    assert [s.name for s in plan.stages] == ["student", "prune", "rewind"] and plan.final.keep_words == ("COVID-19",)
    assert plan.stages[2].keep_mask and plan.stages[2].qat == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"stages": [{"name": "a", "lr": 1}]}, r"plan p, stage 1: unknown key\(s\) \['lr'\]"),
        ({"stages": [{"name": "a"}, {"name": "a"}]}, "two stages are named 'a'"),
        ({"stages": [{"name": "final"}]}, "`name` must be a folder-safe word"),
        ({"stages": [{"name": "s", "student_layers": [2, 0]}]}, "stage s: `student_layers` must be increasing"),
        ({"stages": [{"name": "s", "start": "dense"}]}, "stage s: `start` is `teacher` or `previous`"),
        (
            {"stages": [{"name": "q", "qat": {}}, prune_stage()]},
            "stage prune: it prunes or cuts layers after stage q trained for int8",
        ),
        ({"stages": [{"name": "r", "keep_mask": True}]}, "stage r: `keep_mask` holds the previous stage's"),
        ({"stages": [prune_stage(shrink=True)]}, "stage prune: `shrink` cuts structurally pruned heads"),
        (
            {"stages": [prune_stage(callback=STRUCTURED, shrink=True), {"name": "next"}]},
            "stage prune: `shrink` cuts attention heads, and stage next would train from that model",
        ),
        (
            {"stages": [prune_stage(), {"name": "s", "student_layers": [0]}]},
            "stage s: `student_layers` cuts layers out of stage prune's pruned model",
        ),
        (
            {"stages": [{"name": "s", "overlay": {"model": {"init_args": {"model_name_or_path": "x"}}}}]},
            "stage s: `overlay` sets the stage's weights",
        ),
        ({"stages": [{"name": "s"}], "final": {"format": "tflite"}}, r"final: `format` is one of"),
        ({"stages": [{"name": "q", "qat": {}, "openvino_qat": {}}]}, "stage q: `qat` and `openvino_qat` both"),
        (
            {"stages": [{"name": "q", "openvino_qat": {}}, {"name": "s"}], "final": OPENVINO_INT8},
            "stage q: `openvino_qat` trains NNCF's quantized model, which no later stage can start from",
        ),
        (
            {"stages": [prune_stage(callback=STRUCTURED, shrink=True, openvino_qat={})], "final": OPENVINO_INT8},
            "stage prune: `shrink` would cut units out of NNCF's quantized model",
        ),
        (
            {"stages": [{"name": "t", "qat": {}}, {"name": "q", "openvino_qat": {}}], "final": OPENVINO_INT8},
            "stage q: `openvino_qat` quantizes again what stage t trained with `qat`",
        ),
        (
            {"stages": [prune_stage(callback={"class_path": "lightning_memopt.OpenVINOQuantizationAwareTraining"})]},
            "stage prune: its overlay adds OpenVINOQuantizationAwareTraining; use the stage key `openvino_qat`",
        ),
        ({"stages": [{"name": "q", "openvino_qat": {}}]}, "stage q: `openvino_qat`'s learned scales reach only"),
        (
            {"stages": [{"name": "q", "openvino_qat": {}}], "final": {**OPENVINO_INT8, "trim_vocabulary": True}},
            "final: `trim_vocabulary` would rebuild the embeddings after stage q",
        ),
        (
            {"stages": [{"name": "q", "openvino_qat": {}}], "final": {**OPENVINO_INT8, "embedding_bits": 4}},
            "final: `embedding_bits` recompresses the embeddings of a post-training int8 export, but stage q",
        ),
        ({"stages": [{"name": "s"}], "final": {"embedding_bits": 2}}, "final: `embedding_bits` is 8 or 4, got 2"),
        (
            {"stages": [{"name": "s"}], "final": {**OPENVINO_INT8, "sparse": True}},
            "final: `sparse` packs pruned weights in a transformers",
        ),
        (
            {"stages": [{"name": "s"}], "final": {"format": "onnx", "int8": True, "embedding_bits": 4}},
            "final: `embedding_bits: 4` compresses the embeddings of an OpenVINO int8 artefact",
        ),
        ({"stages": [{"name": "s"}], "kd": {"teacher": "x"}}, "`kd` is a mapping of KnowledgeDistillation options"),
        ({"stage": []}, r"unknown key\(s\) \['stage'\]"),
    ],
)
def test_a_plan_mistake_is_named_before_anything_runs(raw: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan(raw, name="p")


def test_an_openvino_qat_stage_may_prune_without_shrinking_and_older_stages_keep_their_fingerprints() -> None:
    plan = parse_plan(
        {"stages": [prune_stage(callback=STRUCTURED, openvino_qat={"calibration_batches": 2})], "final": OPENVINO_INT8}
    )
    assert plan.stages[0].openvino_qat == {"calibration_batches": 2}
    # A stage without the key hashes as before the key existed, so runs started then still resume.
    assert parse_plan({"stages": [{"name": "s"}]}).stages[0].fingerprint() == "c3b46044d9ddf794"


def test_a_rewind_stage_keeps_the_previous_stages_sparsity_and_distils_from_the_teacher() -> None:
    plan = parse_plan(
        {"kd": {"alpha": 0.9}, "stages": [prune_stage(), {"name": "rewind", "keep_mask": True, "qat": True}]}, "p"
    )
    overlay = stage_overlay(plan, 1, "/runs/prune/export", "teacher.ckpt")
    assert overlay["model"] == {"init_args": {"model_name_or_path": "/runs/prune/export"}}
    kd, kept, qat = overlay["trainer"]["callbacks+"]
    assert kd["init_args"] == {"teacher": "teacher.ckpt", "alpha": 0.9}
    assert kept["init_args"] == {
        "final_sparsity": 0.8,
        "schedule": "constant",
        "start": 0,
        "scope": "global",
        "every": 0.01,
    }
    assert qat == {"class_path": "lightning_memopt.QuantizationAwareTraining", "init_args": {}}
    assert plan.start_of(0) == "teacher" and plan.start_of(1) == "prune"
    undistilled = parse_plan({"stages": [{"name": "s", "distill": False}]}, "p")
    assert "trainer" not in stage_overlay(undistilled, 0, "t", "t")


def test_an_output_folder_of_another_plan_or_a_changed_finished_stage_is_refused(tmp_path: Path) -> None:
    plan = parse_plan({"stages": [prune_stage(), {"name": "rewind", "keep_mask": True}]}, "sparse")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files but no compress\.json"):
        check_resumable(plan, {}, tmp_path, None)
    with pytest.raises(PlanError, match="holds a run of plan 'small', not 'sparse'"):
        check_resumable(plan, {"plan": {"name": "small"}}, tmp_path, None)
    changed = {"plan": {"name": "sparse"}, "stages": {"prune": {"state": "done", "fingerprint": "0" * 16}}}
    with pytest.raises(PlanError, match=r"stage prune: its definition changed.*--restart_from prune"):
        check_resumable(plan, changed, tmp_path, None)
    check_resumable(plan, changed, tmp_path, "prune")  # told to train it again
    same = {
        "plan": {"name": "sparse"},
        "stages": {"prune": {"state": "done", "fingerprint": plan.stages[0].fingerprint()}},
    }
    check_resumable(plan, same, tmp_path, None)


def test_a_student_layer_outside_the_teacher_or_a_teacher_of_another_task_is_refused(tmp_path: Path) -> None:
    tagger = save_tiny_bert(tmp_path / "tagger", BertForTokenClassification, num_labels=3)
    plan = parse_plan({"stages": [{"name": "student", "student_layers": [0, 2]}]}, "p")
    with pytest.raises(PlanError, match=r"`student_layers` \[0, 2\] names layer 2, but the teacher has 2 layers"):
        check_teacher(plan, str(tagger), NER)
    fine = parse_plan({"stages": [{"name": "student", "student_layers": [0, 1]}]}, "p")
    check_teacher(fine, str(tagger), NER)
    with pytest.raises(PlanError, match="holds a BertForTokenClassification, but the recipe trains a SequenceClassif"):
        check_teacher(fine, str(tagger), SST2)


def test_the_latency_switch_reaches_the_runner_and_leaves_the_recipe_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_memopt.cli import compress as command

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(command, "read_plan", lambda path: path)
    monkeypatch.setattr(command, "compress", lambda *args, **options: calls.append((args, options)))
    given = ["--plan", "p.yaml", "--teacher", "t.ckpt", "--output_dir", str(tmp_path), *NER]
    for switch in ([], ["--latency=false"], ["--latency", "True"], ["--latency", "FALSE"]):
        command.compress_command([*given, *switch])
    assert [options["latency"] for _, options in calls] == [True, False, True, False]
    assert all(list(args[3]) == NER for args, _ in calls)
    with pytest.raises(SystemExit):
        command.compress_command([*given, "--latency=maybe"])


@pytest.fixture(scope="module")
def tiny_teacher(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT fine-tuned on the CoNLL slice for 6 steps: the teacher of the end-to-end plans."""
    root = tmp_path_factory.mktemp("teacher")
    memopt(
        [
            "fit",
            *small_ner_args(tiny_bert_dir, conll_small, 6),
            f"--trainer.default_root_dir={root}",
            f"--checkpoint.dirpath={root}",
            f"--last_checkpoint.dirpath={root}",
            f"--trainer.logger.init_args.save_dir={root}",
        ],
        cwd=root,
    )
    return root / "last.ckpt"


TWO_STAGES = {
    "name": "tiny",
    "final": {"trim_vocabulary": True, "keep_words": ["zebra"]},
    "kd": {"alpha": 0.5, "temperature": 2.0},
    "stages": [
        {"name": "student", "student_layers": [1]},
        {
            "name": "prune",
            "overlay": {
                "trainer": {
                    "max_steps": 9,
                    "callbacks+": [
                        {
                            "class_path": "lightning_memopt.PruningScheduler",
                            "init_args": {
                                "final_sparsity": 0.5,
                                "schedule": "cubic",
                                "start": 0,
                                "end": 0.5,
                                "every": 1,
                            },
                        }
                    ],
                }
            },
        },
    ],
}


def memopt_failing(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``memopt`` expecting it may fail: the result, whatever its exit status."""
    return subprocess.run(
        [*memopt_command(), *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def compress_args(plan: Path, teacher: Path, out: Path, recipe: list[str], latency: bool = False) -> list[str]:
    """``memopt compress`` arguments; the latency timing (a fresh process timing every model) only where a test
    reads it."""
    args = ["compress", "--plan", str(plan), "--teacher", str(teacher), "--output_dir", str(out)]
    return [*args, f"--latency={str(latency).lower()}", *recipe]


def test_a_plan_runs_its_stages_in_order_skips_them_when_rerun_and_resumes_a_killed_stage_to_the_same_weights(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tiny_teacher: Path, tmp_path: Path
) -> None:
    plan = tmp_path / "tiny.yaml"
    plan.write_text(yaml.safe_dump(TWO_STAGES))
    recipe = small_ner_args(tiny_bert_dir, conll_small, 6)

    killed_args = [*recipe, "--trainer.callbacks+=helpers.trainers.Interrupt", "--trainer.callbacks.step=7"]
    whole, killed = run_together(  # independent, side by side: the whole plan, and a run killed in stage prune
        [
            (
                [*memopt_command(), *compress_args(plan, tiny_teacher, tmp_path / "whole", recipe, latency=True)],
                tmp_path,
            ),
            ([*memopt_command(), *compress_args(plan, tiny_teacher, tmp_path / "resumed", killed_args)], tmp_path),
        ]
    )
    succeeded(whole)
    state = json.loads((tmp_path / "whole" / "compress.json").read_text())
    assert [state["stages"][name]["state"] for name in ("student", "prune")] == ["done", "done"]
    assert state["stages"]["student"]["steps"] == 6 and state["stages"]["prune"]["steps"] == 9
    assert state["stages"]["prune"]["start"] == "student" and state["stages"]["prune"]["monitor"] == "val_f1"
    assert state["stages"]["prune"]["params"] == state["stages"]["student"]["params"]
    assert state["stages"]["student"]["linear_sparsity"] < 0.05 < 0.45 < state["stages"]["prune"]["linear_sparsity"]
    final = json.loads((tmp_path / "whole" / "final" / "compression.json").read_text())
    assert final["plan"] == "tiny" and final["weights_bytes"] > 0
    assert final["metric"]["name"] == "val_f1" and final["metric"]["examples"] == 65  # scored on its runtime
    assert state["final"]["metric"] == final["metric"]
    assert final["vocabulary"]["before"] == 30522 and final["vocabulary"]["kept"] < 3000  # 160 training sentences
    final_config = json.loads((tmp_path / "whole" / "final" / "config.json").read_text())
    assert final_config["vocab_size"] == final["vocabulary"]["kept"] and final_config["num_hidden_layers"] == 1
    assert "memopt compress: plan tiny" in whole.stdout and "stage 2/2 prune: done" in whole.stdout
    latency = state["latency_ms"]  # --latency=true: every model timed at both batch sizes
    assert set(latency) == {"8x128", "1x128"} and "timing the teacher" in whole.stdout
    assert all(set(ms) == {"teacher", "student", "prune", "final"} for ms in latency.values())
    assert all(ms > 0 for timings in latency.values() for ms in timings.values())
    student_config = json.loads((tmp_path / "whole" / "student" / "export" / "config.json").read_text())
    assert student_config["num_hidden_layers"] == 1

    assert (
        killed.returncode == 2 and "stage prune failed" in killed.stderr and "rerun the same command" in killed.stderr
    )
    assert not (tmp_path / "resumed" / "final").exists()  # an interrupted plan writes no final artefact

    again, resumed = run_together(  # the whole plan rerun, and the killed one resumed, side by side
        [
            ([*memopt_command(), *compress_args(plan, tiny_teacher, tmp_path / "whole", recipe)], tmp_path),
            ([*memopt_command(), *compress_args(plan, tiny_teacher, tmp_path / "resumed", recipe)], tmp_path),
        ]
    )
    assert succeeded(again).stdout.count("done before") == 2 and "resuming" not in again.stdout
    assert "final/: written before from the same stages and plan, kept" in again.stdout
    assert json.loads((tmp_path / "whole" / "final" / "compression.json").read_text()) == final  # not rewritten
    assert "timing the teacher" not in again.stdout  # --latency=false: no timing, no earlier figures kept
    assert "latency_ms" not in json.loads((tmp_path / "whole" / "compress.json").read_text())
    assert "stage 1/2 student: done before" in succeeded(resumed).stdout and "resuming its last.ckpt" in resumed.stdout
    uninterrupted = load_file(tmp_path / "whole" / "prune" / "export" / "model.safetensors")
    after_resume = load_file(tmp_path / "resumed" / "prune" / "export" / "model.safetensors")
    assert uninterrupted.keys() == after_resume.keys()
    assert all((uninterrupted[k] == after_resume[k]).all() for k in uninterrupted)

    changed = dict(TWO_STAGES, stages=[{"name": "student", "student_layers": [0]}, TWO_STAGES["stages"][1]])
    plan.write_text(yaml.safe_dump(changed))
    refused = memopt_failing(compress_args(plan, tiny_teacher, tmp_path / "whole", recipe), tmp_path)
    assert refused.returncode == 2 and "stage student: its definition changed" in refused.stderr


def test_an_openvino_qat_stage_ships_its_trained_scales_as_the_final_graph(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tiny_teacher: Path, tmp_path: Path
) -> None:
    plan = tmp_path / "ov.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "name": "ov",
                "final": {**OPENVINO_INT8, "min_agreement": 0.5},  # a 6-step tiny model's logits lie close together
                "stages": [
                    {"name": "student", "student_layers": [1]},
                    {"name": "int8", "openvino_qat": {"calibration_batches": 2}},
                ],
            }
        )
    )
    recipe = small_ner_args(tiny_bert_dir, conll_small, 6)
    result = succeeded(memopt(compress_args(plan, tiny_teacher, tmp_path / "out", recipe), cwd=tmp_path))
    assert "quantized by NNCF" in result.stdout + result.stderr
    state = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert state["stages"]["int8"]["state"] == "done" and state["stages"]["int8"]["start"] == "student"
    assert "params" not in state["stages"]["int8"] and state["stages"]["int8"]["weights_bytes"] > 0
    overlay = yaml.safe_load((tmp_path / "out" / "int8" / "stage.yaml").read_text())
    classes = [callback["class_path"].rsplit(".", 1)[-1] for callback in overlay["trainer"]["callbacks+"]]
    assert classes == ["OpenVINOQuantizationAwareTraining", "KnowledgeDistillation"]
    final = json.loads((tmp_path / "out" / "final" / "compression.json").read_text())
    assert final["format"] == "openvino-int8"
    assert any("learned in OpenVINOQuantizationAwareTraining" in line for line in final["lines"])
    assert final["metric"]["examples"] == 65  # scored on OpenVINO

    import openvino as ov

    graph = ov.Core().read_model(tmp_path / "out" / "final" / "openvino_model.xml")
    assert any(op.get_type_name() == "FakeQuantize" for op in graph.get_ops())


def test_a_plan_runs_under_two_ddp_processes_as_memopt_fit_does(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tiny_teacher: Path, tmp_path: Path
) -> None:
    plan = tmp_path / "student.yaml"
    final = {
        "format": "openvino",
        "int8": True,
        "trim_vocabulary": True,
        "embedding_bits": 4,
        "calibration_sentences": 20,
        "min_agreement": 0.9,
    }  # a random tiny model has near-ties
    plan.write_text(
        yaml.safe_dump({"name": "student", "stages": [{"name": "student", "student_layers": [0]}], "final": final})
    )
    recipe = [*small_ner_args(tiny_bert_dir, conll_small, 4), *DDP_TWO_CPUS]
    memopt(compress_args(plan, tiny_teacher, tmp_path / "out", recipe), cwd=tmp_path)
    state = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert state["stages"]["student"]["state"] == "done" and state["stages"]["student"]["steps"] == 4
    (saved,) = (tmp_path / "out" / "student" / "logs").glob("*/config.yaml")  # what memopt fit ran
    stage_config = yaml.safe_load(saved.read_text())
    assert str(stage_config["trainer"]["devices"]) == "2" and "DDPStrategy" in str(stage_config["trainer"]["strategy"])
    shipped = json.loads((tmp_path / "out" / "final" / "compression.json").read_text())
    assert shipped["format"] == "openvino-int8" and (tmp_path / "out" / "final" / "openvino_model.xml").exists()
    assert any("NNCF post-training quantization on 20 calibration sentences, int4 embeddings" in line
               for line in shipped["lines"])  # fmt: skip
    import openvino as ov

    vocab = json.loads((tmp_path / "out" / "final" / "config.json").read_text())["vocab_size"]
    assert vocab == shipped["vocabulary"]["kept"] < 3000
    graph = ov.Core().read_model(tmp_path / "out" / "final" / "openvino_model.xml")
    constants = [op for op in graph.get_ops() if op.get_type_name() == "Constant"]
    by_vocab = {
        (tuple(op.get_output_partial_shape(0).to_shape()), str(op.get_output_element_type(0)))
        for op in constants
        if list(op.get_output_partial_shape(0).to_shape())[:1] == [vocab]
    }
    # the trimmed table in int4 (32 wide: one group a row) with an fp16 scale and a 4-bit zero point per row
    assert by_vocab == {
        ((vocab, 32), "<Type: 'uint4_t'>"),
        ((vocab, 1), "<Type: 'float16'>"),
        ((vocab, 1), "<Type: 'uint4_t'>"),
    }


def test_the_report_renders_from_compress_json_and_the_logs_alone(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from lightning_memopt.compress.report import kept_units, stage_rows, tradeoff_points, write_report

    state = {
        "command": "memopt compress --plan p.yaml",
        "teacher": "teacher.ckpt",
        "plan": {"name": "sparse", "stages": [{"name": "prune", "shrink": True}, {"name": "rewind"}]},
        "teacher_figures": {"monitor": "val_f1", "final": 0.9, "params": 100, "weights_bytes": 2**21},
        "stages": {
            "prune": {
                "state": "done",
                "start": "teacher",
                "steps": 4,
                "monitor": "val_f1",
                "final": 0.891,
                "params": 100,
                "linear_sparsity": 0.8,
                "weights_bytes": 2**21,
                "seconds": 3.0,
            },
            "rewind": {"state": "running", "start": "prune", "fingerprint": "x"},
        },
    }
    state["latency_ms"] = {"8x128": {"teacher": 50.0, "prune": 40.0}}
    (tmp_path / "compress.json").write_text(json.dumps(state))
    logs = tmp_path / "prune" / "logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,sparsity,step,val_f1\n0,0.4,1,\n0,0.8,3,\n0,,3,0.891\n")
    (tmp_path / "prune" / "export").mkdir()
    weight = torch.ones(4, 5)
    weight[:2] = 0
    shrunk = {  # layer 0 keeps 2 of 4 heads (head size 8) and 20 neurons, layer 1 all heads and 37
        "encoder.layer.0.attention.self.query.weight": torch.ones(16, 32),
        "encoder.layer.0.intermediate.dense.weight": torch.ones(20, 32),
        "encoder.layer.1.attention.self.query.weight": torch.ones(32, 32),
        "encoder.layer.1.intermediate.dense.weight": torch.ones(37, 32),
    }
    save_file(
        {
            "encoder.layer.0.output.dense.weight": weight,
            "embeddings.word_embeddings.weight": torch.zeros(9, 5),
            **shrunk,
        },
        str(tmp_path / "prune" / "export" / "model.safetensors"),
    )
    (tmp_path / "prune" / "export" / "config.json").write_text('{"hidden_size": 32, "num_attention_heads": 4}')
    assert kept_units(tmp_path / "prune" / "export") == {0: (2, 20), 1: (4, 37)}

    page = write_report(tmp_path).read_text()
    assert "| prune (done) | teacher | 4 | 0.8910 | 0.990 | 100 | 80% | 2.0 | 40.0 | 3.0 |" in page
    assert "| teacher |  |  | 0.9000 | 1.000 |" in page and "| rewind (running) | prune |" in page
    for picture in ("tradeoff.png", "stages.png", "layers.png", "units.png"):
        assert f"({picture})" in page and (tmp_path / picture).stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match=r"holds no compress\.json; run memopt compress"):
        write_report(tmp_path / "prune")

    # final/ scored on its own runtime: its row and trade-off point carry its metric, not its last stage's
    finished = dict(state, final={"format": "openvino", "weights_bytes": 2**19, "metric": {"value": 0.88}})
    finished["latency_ms"] = {"8x128": {**state["latency_ms"]["8x128"], "final": 10.0}}
    assert "| final/ (openvino) |  |  | 0.8800 | 0.978 |  |  | 0.5 | 10.0 |  |" in stage_rows(finished)
    assert tradeoff_points(finished)[-1] == ("final/", 0.5, 10.0, 0.88)


def test_a_plan_runs_on_two_nodes_under_torchrun_with_rank_0_writing(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tiny_teacher: Path, tmp_path: Path
) -> None:
    plan = tmp_path / "two.yaml"
    two = {"name": "two", "stages": [{"name": "student", "student_layers": [0]}, {"name": "again", "distill": False}]}
    plan.write_text(yaml.safe_dump(two))
    recipe = [*small_ner_args(tiny_bert_dir, conll_small, 4), "--config", str(RECIPES / "strategies/multi-node.yaml")]
    recipe += ["--trainer.devices=1", "--trainer.num_nodes=2", "--trainer.accelerator=cpu"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launchers = []
    for node_rank in (0, 1):
        (tmp_path / f"node{node_rank}").mkdir()
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
        torchrun += [f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        command = [
            *torchrun,
            "--no-python",
            *memopt_command(),
            *compress_args(plan, tiny_teacher, tmp_path / "out", recipe),
        ]
        launchers.append(
            subprocess.Popen(
                command,
                cwd=tmp_path / f"node{node_rank}",
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [launcher.communicate(timeout=400)[0] for launcher in launchers]
    for launcher, output in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, output[-5000:]
    state = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert [state["stages"][name]["steps"] for name in ("student", "again")] == [4, 4]
    for name in ("student", "again"):
        (saved,) = (tmp_path / "out" / name / "logs").glob("*/config.yaml")
        assert str(yaml.safe_load(saved.read_text())["trainer"]["num_nodes"]) == "2"
    assert "memopt compress: plan two" in outputs[0] and "memopt compress: plan two" not in outputs[1]
    assert (tmp_path / "out" / "final" / "compression.json").exists()
