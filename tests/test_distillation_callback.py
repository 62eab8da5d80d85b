"""KnowledgeDistillation on real modules: the hand-computed loss, a teacher kept out of everything, clear errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CONLL_LABELS,
    Interrupt,
    fake_trainer,
    fit_tiny_ner,
    load_example,
    quiet_trainer,
    save_tiny_bert,
    tiny_bert_config,
)
from lightning.pytorch import Callback
from transformers import AutoModelForTokenClassification, AutoTokenizer, BertForTokenClassification

from lightning_memopt import (
    KnowledgeDistillation,
    MemoryMonitor,
    TokenClassificationDataModule,
    TokenClassificationModule,
)
from lightning_memopt.distillation import student_from_teacher


def make_teacher(tiny_bert_dir: Path, folder: Path, labels: list[str] = CONLL_LABELS, **config: Any) -> Path:
    """A random tiny BertForTokenClassification with the student's tokenizer, saved to ``folder``."""
    options = {"hidden_size": 48, "intermediate_size": 96, "id2label": dict(enumerate(labels)), **config}
    return save_tiny_bert(folder, BertForTokenClassification, seed=1, **options)


class Recorder(Callback):
    """Keeps the first batch, a copy of the student before its first step, and the step's output."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.batch = copy.deepcopy(batch)
            self.student = copy.deepcopy(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.loss = float(outputs["loss"])
            self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_loss_is_the_hand_computed_mix_of_ce_and_soft_target_kl(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    teacher_dir = make_teacher(tiny_bert_dir, tmp_path / "teacher")
    alpha, temperature = 0.3, 2.0
    kd = KnowledgeDistillation(teacher=str(teacher_dir), alpha=alpha, temperature=temperature)
    recorder = Recorder()
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0  # so the hand computation sees the same student logits
    data = TokenClassificationDataModule(train_file=str(conll_small["train"]), batch_size=8)
    quiet_trainer(max_steps=1, enable_checkpointing=False, callbacks=[recorder, kd]).fit(module, datamodule=data)

    batch = recorder.batch
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    teacher = AutoModelForTokenClassification.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        student_logits = recorder.student.train()(**inputs).logits
        teacher_logits = teacher(**inputs).logits
    keep = batch["labels"] != -100
    assert 0 < int(keep.sum()) < keep.numel()  # padding and continuation sub-tokens are left out
    ce = F.cross_entropy(student_logits[keep], batch["labels"][keep])
    p_teacher = torch.softmax(teacher_logits[keep] / temperature, -1)
    log_p_student = torch.log_softmax(student_logits[keep] / temperature, -1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean() * temperature**2
    assert recorder.logged["train_ce"] == pytest.approx(float(ce), rel=1e-5)
    assert recorder.logged["train_kd"] == pytest.approx(float(kl), rel=1e-5)
    assert recorder.loss == pytest.approx(float((1 - alpha) * ce + alpha * kl), rel=1e-5)
    assert recorder.logged["train_total"] == pytest.approx(recorder.loss, rel=1e-6)


def test_teacher_stays_frozen_outside_optimizer_and_checkpoint_and_resume_works(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    teacher_dir = make_teacher(tiny_bert_dir, tmp_path / "teacher")
    kd = KnowledgeDistillation(teacher=str(teacher_dir), teacher_precision="bf16")
    monitor = MemoryMonitor()
    module, trainer = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "run", [kd, monitor], 6, 3)
    teacher = kd.teacher
    assert teacher is not None and not teacher.training
    # MemoryMonitor shows the teacher on its own lines instead of under "other"
    teacher_bytes = sum(t.numel() * 2 for t in teacher.parameters()) + sum(
        t.numel() * t.element_size() for t in teacher.buffers()
    )
    assert monitor.breakdown["teacher weights (frozen)"] == teacher_bytes
    assert monitor.breakdown["teacher logits (KD)"] % (len(CONLL_LABELS) * 4) == 0  # float32, one row per position
    assert monitor.breakdown["teacher logits (KD)"] >= 16 * len(CONLL_LABELS) * 4  # batch 16, at least a token each
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    reference = AutoModelForTokenClassification.from_pretrained(teacher_dir)
    for (name, value), (_, original) in zip(teacher.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(value.float(), original.to(torch.bfloat16).float()), name
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert "training_step" not in module.__dict__  # the wrapper is gone after fit
    checkpoint = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(module.state_dict())
    assert not any("KnowledgeDistillation" in key for key in checkpoint["callbacks"])

    resumed_kd = KnowledgeDistillation(teacher=str(teacher_dir))
    _, resumed = fit_tiny_ner(
        tiny_bert_dir, conll_small["train"], tmp_path / "run", [resumed_kd], 9, 3, str(tmp_path / "run" / "last.ckpt")
    )
    assert resumed.global_step == 9 and "train_kd" in resumed.callback_metrics


def test_works_with_the_plain_example_project_and_tuple_batches(
    tiny_bert_dir: Path, shared_data: Path, tmp_path: Path
) -> None:
    from transformers import BertForSequenceClassification

    sentiment = load_example()
    teacher = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=1))
    model = sentiment.TinySentimentModel(hidden_size=32, num_layers=2, num_heads=2)
    data = sentiment.SST2Tuples(train_file=str(shared_data / "sst2/train.tsv.gz"), max_train_rows=64, batch_size=16)
    kd = KnowledgeDistillation(
        teacher=teacher,
        alpha=0.7,
        batch_to_teacher_inputs=lambda batch: {"input_ids": batch[0], "attention_mask": batch[1]},
    )
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=False, callbacks=[kd])
    with pytest.warns(UserWarning, match="could not compare the teacher's and the student's tokenizers"):
        trainer.fit(model, datamodule=data)
    assert float(trainer.callback_metrics["train_kd"]) > 0


def test_bad_input_fails_before_training(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        KnowledgeDistillation(teacher=torch.nn.Linear(2, 2), alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        KnowledgeDistillation(teacher=torch.nn.Linear(2, 2), temperature=0)
    with pytest.raises(FileNotFoundError, match=r"teacher 'runs/missing\.ckpt' does not exist"):
        KnowledgeDistillation(teacher="runs/missing.ckpt")

    def fails(teacher_dir: Path, match: str, **options: Any) -> None:
        with pytest.raises(ValueError, match=match):
            fit_tiny_ner(
                tiny_bert_dir,
                conll_small["train"],
                tmp_path / "x",
                [KnowledgeDistillation(str(teacher_dir), **options)],
                2,
                10,
            )

    fails(make_teacher(tiny_bert_dir, tmp_path / "t3", labels=["O", "B-PER", "I-PER"]), "teacher predicts 3 labels")
    swapped = [CONLL_LABELS[0], CONLL_LABELS[2], CONLL_LABELS[1], *CONLL_LABELS[3:]]
    fails(make_teacher(tiny_bert_dir, tmp_path / "order", labels=swapped), r"labels .* differ \(names or order\)")
    fails(make_teacher(tiny_bert_dir, tmp_path / "vocab", vocab_size=1000), "vocabulary has 1000 tokens")
    cased = make_teacher(tiny_bert_dir, tmp_path / "cased")
    AutoTokenizer.from_pretrained(tiny_bert_dir, do_lower_case=False).save_pretrained(cased)
    fails(cased, "tokenize the probe text differently")
    fails(
        make_teacher(tiny_bert_dir, tmp_path / "ok"),
        "student_module='decoder' is not a submodule",
        student_module="decoder",
    )

    from lightning.pytorch.strategies import FSDPStrategy

    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy: .*ModelParallelStrategy"):
        KnowledgeDistillation(torch.nn.Linear(2, 2)).setup(fake_trainer(FSDPStrategy()), module, "fit")


def test_student_from_teacher_keeps_chosen_layers_and_refuses_bad_ones(tiny_bert_dir: Path, tmp_path: Path) -> None:
    teacher = AutoModelForTokenClassification.from_pretrained(make_teacher(tiny_bert_dir, tmp_path / "t"))
    student = student_from_teacher(teacher, [1])
    assert student.config.num_hidden_layers == 1
    for (name, value), (_, original) in zip(
        student.bert.encoder.layer[0].state_dict().items(),
        teacher.bert.encoder.layer[1].state_dict().items(),
        strict=True,
    ):
        assert torch.equal(value, original), name
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    with pytest.raises(ValueError, match=r"layers must be increasing indices of the teacher's 2 layers \(0..1\)"):
        student_from_teacher(teacher, [0, 2])


def test_recipe_flow_teacher_student_then_ddp_distillation(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    """The three commands of recipes/distillation/ner.yaml, the last one on 2 DDP processes."""

    from helpers import DDP_TWO_CPUS, PROJECT_ROOT, digest_args, memopt, read_digests, small_ner_args

    # 4 steps: last.ckpt is written after the final validation, so it records the teacher's best val_f1.
    memopt(["fit", *small_ner_args(tiny_bert_dir, conll_small, steps=4)], cwd=tmp_path)
    teacher_ckpt = tmp_path / "runs/ner-conll2003/checkpoints/last.ckpt"
    teacher_mtime = teacher_ckpt.stat().st_mtime_ns
    result = memopt(
        ["student", f"--teacher={teacher_ckpt}", "--layers=[1]", "--output_dir=students/ner-l3"], cwd=tmp_path
    )
    assert "Student with teacher layers [1]" in result.stdout
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "students/ner-l3").config.num_hidden_layers == 1
    args = [
        "fit",
        *small_ner_args(tiny_bert_dir, conll_small, steps=4),
        "--config",
        str(PROJECT_ROOT / "recipes/distillation/ner.yaml"),
        *DDP_TWO_CPUS,
        *digest_args(tmp_path / "digests"),
    ]
    result = memopt(args, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "KnowledgeDistillation: teacher BertForTokenClassification" in output
    summary = output[output.index("KnowledgeDistillation: metric") :].splitlines()
    assert any(line.split()[0] == "val_f1" and line.split()[2] != "-" for line in summary[1:4])  # teacher's score
    assert any(line.split()[0] == "val_agreement" for line in summary[1:4])
    records = read_digests(tmp_path / "digests")
    assert len(records) == 2 and records[0]["digest"] == records[1]["digest"]
    student_ckpt = torch.load(tmp_path / "runs/ner-conll2003-distilled/checkpoints/last.ckpt", weights_only=True)
    assert student_ckpt["global_step"] == 4 and not any("teacher" in key for key in student_ckpt["state_dict"])
    assert teacher_ckpt.stat().st_mtime_ns == teacher_mtime  # the teacher's run is left alone


def test_intermediate_layers_train_a_projection_that_resumes_exactly_and_stays_out_of_the_student(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    teacher_dir = make_teacher(tiny_bert_dir, tmp_path / "teacher")  # width 48 vs the student's 32

    def distillation() -> KnowledgeDistillation:
        options = {"hidden_layers": {1: 1, 2: 2}, "hidden_weight": 1.0, "attention_layers": {0: 0, 1: 1}}
        return KnowledgeDistillation(str(teacher_dir), alpha=0.9, alpha_end=0.1, attention_weight=0.5, **options)

    kd = distillation()
    module, trainer = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "straight", [kd], 6, 2)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["train_hidden"] > 0 and metrics["train_attention"] > 0
    assert metrics["kd_alpha"] == pytest.approx(0.9 + (0.1 - 0.9) * 5 / 6)  # the 6th step is global step 5
    alpha, parts = metrics["kd_alpha"], metrics["train_hidden"] + 0.5 * metrics["train_attention"]
    expected_total = (1 - alpha) * metrics["train_ce"] + alpha * metrics["train_kd"] + parts
    assert metrics["train_total"] == pytest.approx(expected_total, rel=1e-5)
    projection = kd.layers.projections["1"]
    assert projection.weight.shape == (48, 32)
    groups = trainer.optimizers[0].param_groups
    assert any(projection.weight is p for p in groups[-1]["params"])
    assert groups[-1]["initial_lr"] == groups[0]["initial_lr"] > 0 and groups[-1]["lr"] == groups[0]["lr"]
    assert module.model.config.output_hidden_states is False and module.model.config._attn_implementation == "sdpa"
    checkpoint = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    assert not any("projection" in key for key in checkpoint["state_dict"])
    saved = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("KnowledgeDistillation"))
    assert torch.equal(saved["projections"]["projections.1.weight"], projection.weight.detach())

    with pytest.raises(SystemExit):
        fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path / "resumed", [distillation(), Interrupt(3)], 6, 2)
    resumed = distillation()
    again, _ = fit_tiny_ner(
        tiny_bert_dir, conll_small["train"], tmp_path / "resumed", [resumed], 6, 2, str(tmp_path / "resumed/last.ckpt")
    )
    assert torch.equal(resumed.layers.projections["1"].weight, projection.weight)  # restored at step 2, same end
    for (name, a), (_, b) in zip(module.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_layer_maps_are_checked_against_both_models(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden_weight > 0 needs hidden_layers"):
        KnowledgeDistillation(torch.nn.Linear(2, 2), hidden_weight=1.0)
    teacher_dir = make_teacher(tiny_bert_dir, tmp_path / "teacher")
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    kd = KnowledgeDistillation(str(teacher_dir), hidden_layers={3: 1}, hidden_weight=1.0)
    with pytest.raises(ValueError, match=r"hidden_layers maps 3 -> 1, but the student has indices 0..2"):
        kd.setup(fake_trainer(None, datamodule=None), module, "fit")


def test_projections_stay_identical_across_ddp_ranks(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:

    from helpers import DDP_TWO_CPUS, digest_args, memopt, read_digests, small_ner_args

    teacher_dir = make_teacher(tiny_bert_dir, tmp_path / "teacher")  # width 48: a projection is learned
    args = [
        "fit",
        *small_ner_args(tiny_bert_dir, conll_small, steps=3),
        *DDP_TWO_CPUS,
        "--trainer.callbacks+=lightning_memopt.KnowledgeDistillation",
        f"--trainer.callbacks.teacher={teacher_dir}",
        "--trainer.callbacks.hidden_layers={2: 2}",
        "--trainer.callbacks.hidden_weight=1.0",
        *digest_args(tmp_path / "digests"),
    ]
    memopt(args, cwd=tmp_path)
    records = read_digests(tmp_path / "digests")
    assert len(records) == 2 and "KnowledgeDistillation" in records[0]["callbacks"]
    assert records[0]["callbacks"] == records[1]["callbacks"] and records[0]["digest"] == records[1]["digest"]
