"""A peft LoRA model under QAT (the combination users ask for most): the frozen base layers train their int8
rounding, the adapters stay float and trainable, and the merged model exports to int8 and generates."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import quiet_trainer
from helpers.models import TINY_LLAMA, PlainCausalLM
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_memopt import QuantizationAwareTraining
from lightning_memopt.quantization import FakeQuantLinear, Int8DynamicLinear, convert_to_int8, load_int8, save_int8

peft = __import__("pytest").importorskip("peft", reason="peft (in the test extra) is not installed")


def lora_lm() -> PlainCausalLM:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    return PlainCausalLM(peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), 1e-2)


def test_lora_with_qat_quantizes_the_frozen_base_keeps_adapters_float_and_exports_merged(tmp_path: Path) -> None:
    module = lora_lm()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    qat = QuantizationAwareTraining()
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    batches = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)
    quiet_trainer(max_steps=4, callbacks=[qat], enable_checkpointing=False).fit(module, batches)

    assert not any("lora_" in name for name in qat.layers)  # adapters are not quantized...
    assert sum(name.endswith("q_proj.base_layer") for name in qat.layers) == 2  # ...the layers they adapt are
    for name, weight in frozen.items():  # the base stayed frozen; the adapters learned
        assert torch.equal(weight, dict(module.named_parameters())[name]), name
    assert any(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)

    merged = module.model.merge_and_unload().eval()  # adapters folded into their (fake-quantized) base layers
    assert isinstance(merged.model.layers[0].self_attn.q_proj, FakeQuantLinear)
    prompt = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        fake_quantized = merged(prompt).logits
    convert_to_int8(merged)
    save_int8(merged, tmp_path / "int8")
    reloaded = load_int8(tmp_path / "int8")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, Int8DynamicLinear)
    with torch.no_grad():
        assert torch.allclose(reloaded(prompt).logits, fake_quantized, atol=0.05)
    assert reloaded.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 7)
