"""Structured pruning of decoder LMs: grouped-query attention pruned by key/value group, SwiGLU neurons across gate,
up and down projections; resumed exactly; shrunk into a model plain ``from_pretrained`` reloads. GPT-2: heads cut
out of the fused q|k|v ``Conv1D`` (weights stored [in, out]), reloaded by ``load_pretrained``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import Interrupt, quiet_trainer
from helpers.models import TINY_GPT2, TINY_LLAMA, PlainCausalLM
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_memopt import PruningScheduler, load_pretrained
from lightning_memopt.pruning import FFNLayout, find_unit_groups, register_layout, shrink_pruned
from lightning_memopt.pruning.structured import SHRUNK_KEY, zero_units
from lightning_memopt.pruning.units import FFN_LAYOUTS, magnitude_scores, mask_gradient, param_masks


def batches() -> DataLoader:
    ids = torch.randint(
        0, 96, (8, 12), generator=torch.Generator().manual_seed(0)
    )  # 2 batches: an epoch per checkpoint
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)


def pruning(criterion: str = "magnitude") -> PruningScheduler:
    return PruningScheduler(
        final_sparsity=0.5, structure="heads_and_neurons", scope="layer", start=0, end=4, every=2, criterion=criterion
    )


def fit(
    root: Path, callbacks: list, ckpt_path: str | None = None, model: Callable[[], nn.Module] | None = None
) -> PlainCausalLM:
    module = PlainCausalLM(model() if model else None)
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


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**TINY_GPT2))


def test_gpt2_heads_own_a_slice_of_each_third_of_the_fused_qkv_and_conv1d_units_mask_and_score_right() -> None:
    model = tiny_gpt2()
    groups = {group.name: group for group in find_unit_groups(model, "heads_and_neurons")}
    assert list(groups) == ["transformer.h.0", "transformer.h.0.attn", "transformer.h.1", "transformer.h.1.attn"]
    attention, mlp = groups["transformer.h.0.attn"], groups["transformer.h.0"]
    assert (attention.kind, attention.count, attention.size, mlp.kind, mlp.count) == ("head", 4, 8, "neuron", 128)
    pieces = {p.param.removeprefix("transformer.h.0."): (p.dim, p.size, p.parts) for p in attention.slices + mlp.slices}
    assert pieces == {
        "attn.c_attn.weight": (1, 8, 3),  # Conv1D [in, out]: a head's 8 output columns in each of q, k and v
        "attn.c_attn.bias": (0, 8, 3),
        "attn.c_proj.weight": (0, 8, 1),  # its 8 input rows
        "mlp.c_fc.weight": (1, 1, 1),
        "mlp.c_fc.bias": (0, 1, 1),
        "mlp.c_proj.weight": (0, 1, 1),
    }

    params = dict(model.named_parameters())
    c_attn, c_proj = (params[f"transformer.h.0.attn.{name}.weight"].detach() for name in ("c_attn", "c_proj"))
    columns = [[third * 32 + 8 * head + i for third in range(3) for i in range(8)] for head in range(4)]
    masks = param_masks(attention, torch.tensor([True, True, False, True]), {n: p.shape for n, p in params.items()})
    dropped = torch.ones(96, dtype=torch.bool)
    dropped[columns[2]] = False  # q 16-23, k 48-55, v 80-87
    assert torch.equal(masks["transformer.h.0.attn.c_attn.weight"], dropped.expand(32, 96))
    assert torch.equal(masks["transformer.h.0.attn.c_attn.bias"], dropped)
    assert (~masks["transformer.h.0.attn.c_proj.weight"]).all(dim=1).nonzero().squeeze(1).tolist() == [*range(16, 24)]
    norms = [
        torch.cat([c_attn[:, cols].flatten(), c_proj[8 * h : 8 * h + 8].flatten()]).norm()
        for h, cols in enumerate(columns)
    ]
    assert torch.allclose(magnitude_scores(attention, params), torch.stack(norms))

    # dL/dm of a gate on each head's (neuron's) input features of c_proj, as mask_gradient reads it off Conv1D
    block = model.transformer.h[0]
    head_gate, neuron_gate = torch.ones(4, requires_grad=True), torch.ones(128, requires_grad=True)
    block.attn.c_proj.register_forward_pre_hook(lambda m, a: (a[0] * head_gate.repeat_interleave(8),))
    block.mlp.c_proj.register_forward_pre_hook(lambda m, a: (a[0] * neuron_gate,))
    prompt = torch.tensor([[5, 17, 42, 8, 3]])
    model(prompt, labels=prompt).loss.backward()
    for group, gate in ((attention, head_gate), (mlp, neuron_gate)):
        weight = model.get_parameter(group.output)
        assert torch.allclose(mask_gradient(group, weight, weight.grad), gate.grad, atol=1e-6), group.name


@pytest.mark.filterwarnings("ignore:PruningScheduler\\(criterion='gradient', start=0\\)")
def test_gpt2_structured_pruning_resumes_exactly_and_shrinks_into_a_model_load_pretrained_reloads(
    tmp_path: Path,
) -> None:
    straight = fit(tmp_path / "straight", [pruning("gradient")], model=tiny_gpt2)
    with pytest.raises(SystemExit):
        fit(tmp_path / "resumed", [pruning("gradient"), Interrupt(5)], model=tiny_gpt2)
    resumed = fit(tmp_path / "resumed", [pruning("gradient")], str(tmp_path / "resumed/last.ckpt"), model=tiny_gpt2)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    model = straight.model.eval()
    params = dict(model.named_parameters())
    for group in find_unit_groups(model, "heads_and_neurons"):  # half the heads and neurons, wholly zero
        assert int(zero_units(group, params).sum()) == group.count // 2, group.name
    prompt = torch.tensor([[5, 17, 42, 8, 3]])
    with torch.no_grad():
        masked = model(prompt).logits
    report = shrink_pruned(model, heads=True)
    assert report.params_after < 0.75 * report.params_before
    attention = model.transformer.h[0].attn
    assert (attention.num_heads, attention.split_size, attention.head_dim) == (2, 16, 8)
    assert attention.c_attn.weight.shape == (32, 48) and attention.c_proj.weight.shape == (16, 32)
    assert model.transformer.h[1].mlp.c_fc.weight.shape == (32, 64) and model.config.n_inner == 64
    assert getattr(model.config, SHRUNK_KEY) == {"heads": {"transformer.h.0.attn": 2, "transformer.h.1.attn": 2}}
    with torch.no_grad():
        assert torch.allclose(model(prompt).logits, masked, atol=1e-5)

    model.save_pretrained(tmp_path / "shrunk")
    with pytest.raises(RuntimeError, match="mismatch"):  # never silently back at full size
        GPT2LMHeadModel.from_pretrained(tmp_path / "shrunk")
    reloaded = load_pretrained(tmp_path / "shrunk")
    assert reloaded.transformer.h[1].attn.split_size == 16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert torch.allclose(reloaded(prompt).logits, masked, atol=1e-5)
    assert torch.equal(
        reloaded.generate(prompt, max_new_tokens=4, do_sample=False),
        model.generate(prompt, max_new_tokens=4, do_sample=False),
    )


def test_gpt2_layers_keeping_different_heads_are_recorded_per_layer_and_reload(tmp_path: Path) -> None:
    model = tiny_gpt2().eval()
    params = dict(model.named_parameters())
    shapes = {name: param.shape for name, param in params.items()}
    heads = find_unit_groups(model, "heads")
    with torch.no_grad():  # layer 0 loses head 0, layer 1 heads 1 and 3
        for group, keep in zip(heads, ([False, True, True, True], [True, False, True, False]), strict=True):
            for name, mask in param_masks(group, torch.tensor(keep), shapes).items():
                params[name].mul_(mask)
    prompt = torch.tensor([[5, 17, 42, 8, 3]])
    with torch.no_grad():
        masked = model(prompt).logits
    report = shrink_pruned(model, heads=True)
    assert report.heads_kept == {"transformer.h.0.attn": 3, "transformer.h.1.attn": 2} and report.neurons_kept == 128
    assert [block.attn.split_size for block in model.transformer.h] == [24, 16]
    assert [group.count for group in find_unit_groups(model, "heads")] == [3, 2]  # the shrunk model's own heads
    model.save_pretrained(tmp_path / "shrunk")
    reloaded = load_pretrained(tmp_path / "shrunk")
    with torch.no_grad():
        assert torch.allclose(model(prompt).logits, masked, atol=1e-5)
        assert torch.allclose(reloaded(prompt).logits, masked, atol=1e-5)
