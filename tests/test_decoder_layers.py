"""GPT-2's Conv1D layers (weight stored transposed) are pruned, fake-quantized and exported to int8 like Linear ones."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import quiet_trainer
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lightning_memopt import PruningScheduler, QuantizationAwareTraining
from lightning_memopt.core.filters import default_filter, linear_weight
from lightning_memopt.quantization import (
    FakeQuantConv1D,
    FakeQuantEmbedding,
    Int8DynamicLinear,
    Int8Embedding,
    convert_to_int8,
    load_int8,
    save_int8,
)


class CausalLM(LightningModule):
    """A plain module whose training step calls ``self.model(...)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def batches() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (8, 12), generator=generator)
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)


def test_the_default_filter_selects_gpt2s_conv1d_layers_but_not_its_head() -> None:
    model = CausalLM().model
    selected = [name for name, module in model.named_modules() if default_filter(module, name)]
    assert len(selected) == 8 and all(isinstance(model.get_submodule(name), Conv1D) for name in selected)
    assert "lm_head" not in selected


def test_pruning_qat_and_int8_export_on_gpt2(tmp_path: Path) -> None:
    module = CausalLM()
    pruning = PruningScheduler(final_sparsity=0.5, schedule="constant", start=0)
    qat = QuantizationAwareTraining()
    quiet_trainer(max_steps=4, callbacks=[pruning, qat], enable_checkpointing=False).fit(module, batches())
    layers = [m for m in module.model.modules() if isinstance(m, FakeQuantConv1D)]
    assert len(layers) == 8 and qat.enabled
    for name, weight in pruning.weights.items():  # masks act on the transposed weights too
        assert abs(float((weight == 0).float().mean()) - 0.5) < 0.02, name

    model = module.model.eval()
    prompt = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        fake_quantized = model(prompt).logits
    names = convert_to_int8(model, names=[n.removeprefix("model.") for n in qat.layers])
    assert len(names) == 8 and all(isinstance(model.get_submodule(n), Int8DynamicLinear) for n in names)
    with torch.no_grad():
        assert torch.allclose(model(prompt).logits, fake_quantized, atol=0.05)  # int8 runs what QAT simulated
    save_int8(model, tmp_path / "int8")
    reloaded = load_int8(tmp_path / "int8")
    generated = reloaded.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)


def test_linear_weight_reads_conv1d_as_out_by_in() -> None:
    layer = Conv1D(nf=6, nx=4)
    assert linear_weight(layer).shape == (6, 4)


def test_the_lm_head_is_an_opt_in_int8_target_tied_or_not(tmp_path: Path) -> None:
    """The LM head (often an LLM's largest matrix) joins QAT and the int8 export when named; GPT-2 ties it to
    the input embeddings, which stay float."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = CausalLM()
    llama.model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    for module, patterns in ((CausalLM(), [r"\.h\.\d+\.(attn|mlp)\.c_", "lm_head"]), (llama, [r"_proj$", "lm_head"])):
        qat = QuantizationAwareTraining(modules=patterns)
        quiet_trainer(max_steps=2, callbacks=[qat], enable_checkpointing=False).fit(module, batches())
        assert "model.lm_head" in qat.layers
        model = module.model.eval()
        prompt = torch.tensor([[5, 17, 42, 8]])
        with torch.no_grad():
            fake_quantized = model(prompt).logits
        convert_to_int8(model)
        folder = tmp_path / type(model).__name__
        save_int8(model, folder)
        reloaded = load_int8(folder)
        assert isinstance(reloaded.lm_head, Int8DynamicLinear)
        assert reloaded.get_input_embeddings().weight.dtype == torch.float32
        with torch.no_grad():
            assert torch.allclose(reloaded(prompt).logits, fake_quantized, atol=1e-3)
        assert reloaded.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_int8_embedding_rows_stay_within_half_a_step_of_the_float_table() -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 16)
    table.weight.data[3] *= 100  # rows of very different ranges keep their own scale
    int8 = Int8Embedding.from_embedding(table)
    ids = torch.arange(50).view(5, 10)
    step = int8.weight_scale[ids].unsqueeze(-1)
    error = (int8(ids) - table(ids)).abs()
    assert int8.weight.dtype == torch.int8 and (error <= step * (0.5 + 1e-5)).all()
    assert error[0, 3].max() > error[0, 2].max()  # the wide row has the coarser grid, not every row


def test_input_embeddings_are_an_opt_in_int8_target_with_per_row_scales(tmp_path: Path) -> None:
    """Named word embeddings train with int8-rounded rows and export as int8 rows (a quarter of the bytes); the
    default filter leaves them float. GPT-2 ties its LM head to them: the head stays a float copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = CausalLM()
    llama.model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert (
        QuantizationAwareTraining().module_filter(llama.model.model.embed_tokens, "model.model.embed_tokens") is False
    )
    for module, patterns in (
        (CausalLM(), [r"\.h\.\d+\.(attn|mlp)\.c_", r"\.wte$"]),
        (llama, [r"_proj$", "embed_tokens"]),
    ):
        qat = QuantizationAwareTraining(modules=patterns)
        quiet_trainer(max_steps=2, callbacks=[qat], enable_checkpointing=False).fit(module, batches())
        model = module.model.eval()
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings, FakeQuantEmbedding)
        prompt = torch.tensor([[5, 17, 42, 8]])
        with torch.no_grad():
            fake_quantized, rows = model(prompt).logits, embeddings(prompt)
            embeddings.fake_quant = False
            assert not torch.equal(embeddings(prompt), rows)  # the rows were rounded in training
        float_bytes = embeddings.weight.numel() * 4
        convert_to_int8(model)
        folder = tmp_path / type(model).__name__
        save_int8(model, folder)
        reloaded = load_int8(folder)
        table = reloaded.get_input_embeddings()
        assert (
            isinstance(table, Int8Embedding) and table.weight.numel() + 4 * table.weight_scale.numel() < float_bytes / 3
        )
        assert reloaded.get_output_embeddings().weight.dtype == torch.float32
        with torch.no_grad():
            assert torch.allclose(table(prompt), rows, atol=1e-6)  # the int8 table holds the rows training saw
            assert torch.allclose(reloaded(prompt).logits, fake_quantized, atol=1e-3)  # the int8 kernel's rounding
        assert reloaded.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 7)
