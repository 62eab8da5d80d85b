"""PruningScheduler on real modules: exact sparsity, zeros that stay zero, exact resume, clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    CONLL_LABELS,
    Interrupt,
    fake_trainer,
    fit_tiny_ner,
    load_example,
    quiet_trainer,
)

from lightning_memopt import PruningScheduler, TokenClassificationModule


def fit(
    tiny_bert_dir: Path, conll_small: dict[str, Path], root: Path, pruning: PruningScheduler, *extra, ckpt_path=None
):
    """16 steps on 160 sentences, ``root/last.ckpt`` every 5 steps."""
    return fit_tiny_ner(tiny_bert_dir, conll_small["train"], root, [pruning, *extra], 16, 5, ckpt_path)


def schedule(criterion: str = "magnitude", structure: str = "unstructured") -> PruningScheduler:
    return PruningScheduler(
        final_sparsity=0.6, schedule="cubic", start=2, end=10, every=2, criterion=criterion, structure=structure
    )


def test_reaches_exact_sparsity_and_zeros_stay_zero(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    pruning = PruningScheduler(final_sparsity=0.6, start=2, end=10, every=2, plot_path=str(tmp_path / "pruning.png"))
    module, trainer = fit(tiny_bert_dir, conll_small, tmp_path, pruning)
    assert len(pruning.weights) == 2 * 6  # query, key, value, attention output, intermediate, output per layer
    for name, weight in pruning.weights.items():
        assert int((weight == 0).sum()) == round(0.6 * weight.numel()), name
        state = trainer.optimizers[0].state[weight]
        assert (state["exp_avg"][weight == 0] == 0).all() and (state["exp_avg_sq"][weight == 0] == 0).all()
    untouched = dict(module.named_parameters())
    assert int((untouched["model.classifier.weight"] == 0).sum()) == 0
    embeddings = untouched["model.bert.embeddings.word_embeddings.weight"]
    assert int((embeddings == 0).sum()) == embeddings.shape[1]  # only the padding row, zero from initialisation
    assert trainer.callback_metrics["sparsity"] == pytest.approx(0.6)
    assert [step for step, _ in pruning.history] == [4, 6, 8, 10]  # step 2 of the cubic ramp is still 0
    assert (tmp_path / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last_row = pruning.sparsity_table().splitlines()[-1].split()
    assert last_row[0] == "total" and float(last_row[1]) == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize(
    ("criterion", "structure"),
    [("magnitude", "unstructured"), ("movement", "unstructured"), ("gradient", "heads_and_neurons")],
)
def test_resume_mid_schedule_ends_with_identical_masks(
    criterion: str, structure: str, tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    reference = schedule(criterion, structure)
    straight, _ = fit(tiny_bert_dir, conll_small, tmp_path / "straight", reference)
    with pytest.raises(SystemExit):
        fit(tiny_bert_dir, conll_small, tmp_path / "resumed", schedule(criterion, structure), Interrupt(step=7))
    saved = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("PruningScheduler"))
    assert 0 < state["sparsity"] < 0.6  # interrupted mid-schedule
    resumed_pruning = schedule(criterion, structure)
    resumed, _ = fit(
        tiny_bert_dir,
        conll_small,
        tmp_path / "resumed",
        resumed_pruning,
        ckpt_path=str(tmp_path / "resumed" / "last.ckpt"),
    )
    assert set(resumed_pruning.masks) == set(reference.masks)
    for name, keep in reference.kept_units.items():
        assert torch.equal(keep, resumed_pruning.kept_units[name]), name
    for name, mask in reference.masks.items():
        assert torch.equal(mask, resumed_pruning.masks[name]), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_movement_ranks_by_accumulated_weight_times_gradient(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    magnitude, movement = schedule("magnitude"), schedule("movement")
    fit(tiny_bert_dir, conll_small, tmp_path / "magnitude", magnitude)
    fit(tiny_bert_dir, conll_small, tmp_path / "movement", movement)
    for name, weight in movement.weights.items():
        assert int((weight == 0).sum()) == round(0.6 * weight.numel()), name
        kept = movement.masks[name]
        # Among the weights still kept at the end, pruning removed the lowest movement scores first.
        assert (
            movement.importance[name][kept].min()
            >= movement.importance[name][~kept & (movement.importance[name] > -1)].min()
        )
    differing = sum(int((magnitude.masks[n] != movement.masks[n]).sum()) for n in magnitude.masks)
    assert differing > 0.1 * sum(m.numel() for m in magnitude.masks.values())


def test_global_scope_ranks_across_layers(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    pruning = PruningScheduler(final_sparsity=0.5, schedule="constant", start=0, scope="global")
    fit(tiny_bert_dir, conll_small, tmp_path, pruning)
    zeros = sum(int((w == 0).sum()) for w in pruning.weights.values())
    total = sum(w.numel() for w in pruning.weights.values())
    assert zeros == round(0.5 * total)
    assert len({round(s, 3) for s in pruning.layer_sparsities().values()}) > 1


def test_bad_options_fail_before_training(tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\)"):
        PruningScheduler(final_sparsity=1.5)
    with pytest.raises(ValueError, match="criterion must be 'magnitude' or 'movement' for unstructured"):
        PruningScheduler(criterion="taylor")
    with pytest.raises(ValueError, match="criterion must be 'magnitude' or 'gradient' for structured"):
        PruningScheduler(structure="heads", criterion="movement")
    for structure, criterion in (("unstructured", "movement"), ("heads", "gradient")):
        with pytest.warns(UserWarning, match=rf"criterion='{criterion}', start=0\).*e\.g\. start=0\.1"):
            PruningScheduler(structure=structure, criterion=criterion, start=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PruningScheduler(criterion="movement", start=0.1)
        PruningScheduler(criterion="magnitude", start=0)
    with pytest.raises(ValueError, match="structure must be"):
        PruningScheduler(structure="blocks")
    with pytest.raises(ValueError, match="scope='global' works for unstructured pruning only"):
        PruningScheduler(structure="neurons", scope="global")
    with pytest.raises(ValueError, match="Unknown schedule kind"):
        PruningScheduler(schedule="exponential")
    with pytest.raises(ValueError, match=r"selects no layer.*patterns"):
        fit(tiny_bert_dir, conll_small, tmp_path, PruningScheduler(modules=["decoder"]))
    with pytest.raises(ValueError, match=r"selects none of the heads.*output projections such as"):
        fit(tiny_bert_dir, conll_small, tmp_path, PruningScheduler(structure="heads", modules=["decoder"]))

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = fake_trainer(FSDPStrategy())  # Lightning refuses FSDPStrategy on CPU before our setup
    module = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy.*--trainer.strategy ddp, or ModelParallel"):
        PruningScheduler().setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="the run has only 16 optimizer steps"):
        fit(tiny_bert_dir, conll_small, tmp_path, PruningScheduler(start=0, end=500))


def test_resume_with_other_layers_names_the_difference(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        fit(tiny_bert_dir, conll_small, tmp_path, schedule(), Interrupt(step=6))
    other = PruningScheduler(final_sparsity=0.6, start=2, end=10, every=2, modules=[r"attention\.self"])
    with pytest.raises(ValueError, match=r"pruned with other layers.*only in the checkpoint \['model.bert.encoder"):
        fit(tiny_bert_dir, conll_small, tmp_path, other, ckpt_path=str(tmp_path / "last.ckpt"))


def test_works_with_the_plain_example_project(shared_data: Path, tmp_path: Path) -> None:
    sentiment = load_example()
    model = sentiment.TinySentimentModel(hidden_size=32, num_layers=2, num_heads=2)
    data = sentiment.SST2Tuples(train_file=str(shared_data / "sst2/train.tsv.gz"), max_train_rows=200, batch_size=16)
    pruning = PruningScheduler(final_sparsity=0.5, start=0, end=6, every=2)
    trainer = quiet_trainer(max_steps=10, enable_checkpointing=False, callbacks=[pruning])
    trainer.fit(model, datamodule=data)
    assert pruning.weights and not any("head" in name for name in pruning.weights)
    assert all(abs(s - 0.5) < 1e-3 for s in pruning.layer_sparsities().values())

    structured = PruningScheduler(final_sparsity=0.5, structure="heads_and_neurons", start=0, end=6, every=2)
    trainer = quiet_trainer(max_steps=8, enable_checkpointing=False, callbacks=[structured])
    trainer.fit(model, datamodule=data)
    assert len(structured.groups) == 4  # 2 layers: heads and neurons of the user's own BertModel
    assert [int(keep.sum()) for keep in structured.kept_units.values()] == [64, 1, 64, 1]


def test_overlay_on_ddp_gives_identical_masks_on_both_ranks(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    from helpers import fit_overlay_on_ddp, memopt

    log, records = fit_overlay_on_ddp("pruning/unstructured-80.yaml", tiny_bert_dir, conll_small, 6, tmp_path)
    assert "PruningScheduler: 12 weight matrices" in log
    assert len(records) == 2 and records[0]["digest"] == records[1]["digest"]
    checkpoint = torch.load(tmp_path / "runs/ner-conll2003/checkpoints/last.ckpt", weights_only=True)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("PruningScheduler"))
    assert state["sparsity"] == pytest.approx(0.8)  # end = 70 % of 6 steps: reached by step 5

    # Export: a dense folder plain transformers loads, plus the compressed sparse copy.
    from lightning_memopt.pruning import load_sparse

    exported = tmp_path / "exported"
    result = memopt(
        [
            "export",
            f"--ckpt_path={tmp_path / 'runs/ner-conll2003/checkpoints/last.ckpt'}",
            f"--output_dir={exported}",
            "--sparse=true",
        ],
        cwd=tmp_path,
    )
    assert "Sparse copy:" in result.stdout
    sparse = load_sparse(exported / "model.sparse.safetensors")
    query = sparse["bert.encoder.layer.0.attention.self.query.weight"]
    assert int((query == 0).sum()) == round(0.8 * query.numel())
