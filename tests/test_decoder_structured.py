"""Structured pruning of decoder LMs: grouped-query attention pruned by key/value group, SwiGLU neurons across gate,
up and down projections; resumed exactly; shrunk into a model plain ``from_pretrained`` reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import Interrupt, quiet_trainer
from helpers.models import TINY_LLAMA, PlainCausalLM
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_memopt import PruningScheduler
from lightning_memopt.pruning import FFNLayout, find_unit_groups, register_layout, shrink_pruned
from lightning_memopt.pruning.units import FFN_LAYOUTS


def batches() -> DataLoader:
    ids = torch.randint(
        0, 96, (8, 12), generator=torch.Generator().manual_seed(0)
    )  # 2 batches: an epoch per checkpoint
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)


def pruning() -> PruningScheduler:
    return PruningScheduler(final_sparsity=0.5, structure="heads_and_neurons", scope="layer", start=0, end=4, every=2)


def fit(root: Path, callbacks: list, ckpt_path: str | None = None) -> PlainCausalLM:
    module = PlainCausalLM()
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=0, save_last=True, every_n_train_steps=2)
    trainer = quiet_trainer(max_steps=8, max_epochs=-1, default_root_dir=root, callbacks=[checkpoint, *callbacks])
    trainer.fit(module, batches(), ckpt_path=ckpt_path)
    return module


def test_gqa_units_are_key_value_groups_and_swiglu_neurons_span_gate_up_and_down() -> None:
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    groups = {group.name: group for group in find_unit_groups(model, "heads_and_neurons")}
    attention, mlp = groups["model.layers.0.self_attn"], groups["model.layers.0"]
    assert (attention.count, attention.size) == (2, 16)  # 2 key/value heads, each with 2 query heads of 8
    sizes = {piece.param.rsplit(".", 2)[-2]: piece.size for piece in attention.slices}
    assert sizes == {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16}
    assert mlp.kind == "neuron" and mlp.count == 48
    assert {piece.param.rsplit(".", 2)[-2] for piece in mlp.slices} == {"gate_proj", "up_proj", "down_proj"}


def test_llama_structured_pruning_resumes_exactly_and_shrinks_into_a_reloadable_model(tmp_path: Path) -> None:
    straight_pruning = pruning()
    straight = fit(tmp_path / "straight", [straight_pruning])
    with pytest.raises(SystemExit):
        fit(tmp_path / "resumed", [pruning(), Interrupt(5)])
    resumed = fit(tmp_path / "resumed", [pruning()], str(tmp_path / "resumed/last.ckpt"))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    model = straight.model.eval()
    layer = model.model.layers[0]
    q_rows = layer.self_attn.q_proj.weight.detach().ne(0).any(dim=1).view(2, 16)  # per key/value group
    kv_rows = layer.self_attn.k_proj.weight.detach().ne(0).any(dim=1).view(2, 8)
    assert q_rows.all(dim=1).tolist() == kv_rows.all(dim=1).tolist() == (~(~q_rows).all(dim=1)).tolist()
    assert int(kv_rows.all(dim=1).sum()) == 1  # one of the two groups pruned: its query heads went with it
    for projection in ("gate_proj", "up_proj"):
        kept = getattr(layer.mlp, projection).weight.detach().ne(0).any(dim=1)
        assert int(kept.sum()) == 24 and torch.equal(kept, layer.mlp.down_proj.weight.detach().ne(0).any(dim=0))

    prompt = torch.tensor([[5, 17, 42, 8, 3]])
    with torch.no_grad():
        masked = model(prompt).logits
    report = shrink_pruned(model, heads=True)
    assert report.params_after < 0.75 * report.params_before
    assert (model.config.num_key_value_heads, model.config.num_attention_heads, model.config.intermediate_size) == (
        1,
        2,
        24,
    )
    with torch.no_grad():
        assert torch.allclose(model(prompt).logits, masked, atol=1e-5)
    model.save_pretrained(tmp_path / "shrunk")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "shrunk").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(prompt).logits, masked, atol=1e-5)
    assert reloaded.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 9)


def test_a_declared_layout_is_pruned_and_unknown_ones_name_the_way_to_declare_them() -> None:
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(vocab_size=96, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=32))
    with pytest.raises(ValueError, match="register_layout"):
        find_unit_groups(model, "neurons")
    layout = FFNLayout(("mlp.fc_in",), "mlp.fc_out")
    register_layout(layout)
    try:
        (group,) = find_unit_groups(model, "neurons")
        assert group.count == model.config.n_inner or group.count == 4 * 32
    finally:
        FFN_LAYOUTS.remove(layout)
