"""Structured pruning: whole heads and neurons pruned, unit scores as promised, and the shrunk export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fit_tiny_ner, tiny_bert_config
from transformers import AutoModelForTokenClassification, BertModel

from lightning_memopt import PruningScheduler, load_pretrained
from lightning_memopt.cli import main as memopt_main
from lightning_memopt.pruning import find_unit_groups, shrink_pruned
from lightning_memopt.pruning.structured import zero_units
from lightning_memopt.pruning.units import magnitude_scores, mask_gradient


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1000, 2000, (3, 9), generator=generator), "attention_mask": torch.ones(3, 9)}


def test_mask_gradient_equals_autograd_gradient_of_a_unit_gate() -> None:
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(num_hidden_layers=1, num_attention_heads=4, intermediate_size=16))
    layer = model.encoder.layer[0]
    head_gate = torch.ones(4, requires_grad=True)
    neuron_gate = torch.ones(16, requires_grad=True)
    # Gates on the inputs of the output projections: head h's 8 context features, neuron j's activation.
    layer.attention.output.dense.register_forward_pre_hook(lambda m, a: (a[0] * head_gate.repeat_interleave(8),))
    layer.output.dense.register_forward_pre_hook(lambda m, a: (a[0] * neuron_gate,))
    inputs = {key: value[:, :5] for key, value in batch().items()}
    inputs["input_ids"] = inputs["input_ids"] % 100
    model(**inputs).last_hidden_state.pow(2).mean().backward()
    groups = {group.kind: group for group in find_unit_groups(model, "heads_and_neurons")}
    for kind, gate in (("head", head_gate), ("neuron", neuron_gate)):
        weight = model.get_parameter(groups[kind].output)
        assert torch.allclose(mask_gradient(groups[kind], weight, weight.grad), gate.grad, atol=1e-6), kind


def test_prunes_whole_units_to_the_target_and_exports_a_smaller_model(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    pruning = PruningScheduler(
        final_sparsity=0.5, structure="heads_and_neurons", criterion="gradient", start=2, end=10, every=2
    )
    module, trainer = fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [pruning], 16, 5)
    params = dict(module.named_parameters())
    assert {group.kind for group in pruning.groups.values()} == {"head", "neuron"} and len(pruning.groups) == 4
    for name, group in pruning.groups.items():
        kept = pruning.kept_units[name]
        assert int(kept.sum()) == group.count // 2, name  # 1 of 2 heads, 32 of 64 neurons, in every layer
        assert torch.equal(zero_units(group, params), ~kept), name  # pruned units wholly zero, kept ones not
        assert (pruning.importance[name][kept] > 0).all(), name  # mask gradients were accumulated
        exp_avg = trainer.optimizers[0].state[params[group.output]]["exp_avg"]
        assert torch.equal(zero_units(group, {group.output: exp_avg, **params}), ~kept), name
    assert pruning.layer_sparsities() == {name: 0.5 for name in pruning.groups}

    model = module.model.eval()
    with torch.no_grad():
        expected = model(**batch()).logits
    width = model.config.intermediate_size
    report = shrink_pruned(model)
    assert report.neurons_kept == width // 2 and model.config.intermediate_size == width // 2
    removed_bytes = 4 * (report.params_before - report.params_after)
    assert removed_bytes > 0
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "saved").eval()
    report = shrink_pruned(reloaded, heads=True)  # heads are cut after loading
    assert set(report.heads_kept.values()) == {1}
    removed_bytes += 4 * (report.params_before - report.params_after)
    assert reloaded.bert.encoder.layer[0].attention.self.query.out_features == 16
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch()).logits, expected, atol=1e-5)

    # The same through the command line, from the run's checkpoint.
    for folder, extra in (("dense", []), ("shrunk", ["--shrink=true"])):
        memopt_main(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={tmp_path / folder}", *extra])
    exported = load_pretrained(tmp_path / "shrunk")  # neurons and heads cut, shapes from config.json
    assert exported.config.intermediate_size == width // 2
    assert exported.bert.encoder.layer[0].attention.self.query.out_features == 16  # (last.ckpt is step 15 of 16)
    saved = (tmp_path / "dense/model.safetensors").stat().st_size - (
        tmp_path / "shrunk/model.safetensors"
    ).stat().st_size
    assert saved == pytest.approx(removed_bytes, rel=0.01)


def test_magnitude_keeps_the_units_with_the_largest_weights(
    tiny_bert_dir: Path, conll_small: dict[str, Path], tmp_path: Path
) -> None:
    initial = BertModel.from_pretrained(tiny_bert_dir)
    groups = find_unit_groups(initial, "neurons")
    params = dict(initial.named_parameters())
    expected = [torch.argsort(magnitude_scores(g, params), descending=True)[:16].sort().values for g in groups]
    pruning = PruningScheduler(final_sparsity=0.75, schedule="constant", start=0, structure="neurons")
    fit_tiny_ner(tiny_bert_dir, conll_small["train"], tmp_path, [pruning], 2, 100)
    kept = [keep.nonzero().squeeze(1) for keep in pruning.kept_units.values()]  # decided at step 0
    assert [k.tolist() for k in kept] == [e.tolist() for e in expected]


def test_shrinking_needs_the_same_neuron_count_everywhere() -> None:
    model = BertModel(tiny_bert_config())
    with torch.no_grad():
        layer = model.encoder.layer[0]
        layer.intermediate.dense.weight[:8] = 0
        layer.intermediate.dense.bias[:8] = 0
        layer.output.dense.weight[:, :8] = 0
    with pytest.raises(ValueError, match=r"different numbers of feed-forward neurons \(\[56, 64\]\)"):
        shrink_pruned(model)
    with pytest.raises(ValueError, match="No heads found"):
        find_unit_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)), "heads")
