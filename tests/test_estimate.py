"""The memory estimator: the meta-device simulation, the strategy arithmetic and ``memopt estimate``."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from helpers import RECIPES, tiny_bert_config
from transformers import BertForTokenClassification, LlamaConfig, LlamaForCausalLM

from lightning_memopt.cli import main
from lightning_memopt.core.compat import mem_tracker_class
from lightning_memopt.estimate.report import parse_size
from lightning_memopt.estimate.simulation import StepSimulation, _phase, simulate_step
from lightning_memopt.estimate.strategies import (
    device_peak,
    optimizer_state_bytes,
    optimizer_step_temporaries,
    per_device_peak,
    zero_bucket_bytes,
)

CONFIG = tiny_bert_config(
    vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, num_labels=5
)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def real_saved_activation_bytes(batch: int, sequence: int) -> int:
    """Bytes the real CPU model saves for backward (distinct storages, parameters excluded)."""
    torch.manual_seed(0)
    model = BertForTokenClassification(CONFIG).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 500, (batch, sequence))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=torch.randint(0, 5, (batch, sequence)))
    return sum(seen.values())


def test_simulated_state_matches_a_real_model_and_optimizer() -> None:
    step = simulate_step(CONFIG, "token-classification", batch_size=4, sequence_length=32)
    model = BertForTokenClassification(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.randint(0, 500, (4, 32)), labels=torch.zeros(4, 32, dtype=torch.long)).loss.backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
    assert step.parameters == step.gradients == tensor_bytes(list(model.parameters()))
    assert step.optimizer == tensor_bytes(state)
    assert step.blocks == 3
    assert step.largest_block == tensor_bytes(list(model.bert.encoder.layer[0].parameters()))
    assert step.outside_blocks == step.parameters - 3 * step.largest_block
    # Lightning's order: the previous step's gradients are alive at the forward peak.
    assert step.forward.gradients == step.gradients and step.forward.optimizer == step.optimizer


def test_simulated_activations_follow_the_real_saved_tensors() -> None:
    for batch, sequence in [(2, 16), (4, 64)]:
        simulated = simulate_step(CONFIG, "token-classification", batch, sequence).forward.activations
        real = real_saved_activation_bytes(batch, sequence)
        assert abs(simulated / real - 1) < 0.1, (batch, sequence, simulated, real)


def test_checkpointing_and_batch_size_change_activations_as_expected() -> None:
    plain = simulate_step(CONFIG, "token-classification", 4, 64)
    double = simulate_step(CONFIG, "token-classification", 8, 64)
    checkpointed = simulate_step(CONFIG, "token-classification", 4, 64, activation_checkpointing=True)
    assert 1.8 < double.forward.activations / plain.forward.activations < 2.1
    assert checkpointed.forward.activations < plain.forward.activations / 3


def test_cuda_fused_attention_keeps_no_sequence_squared_tensors() -> None:
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def activations(sequence: int, fused: bool) -> int:
        step = simulate_step(CONFIG, "token-classification", 4, sequence, fused_attention=fused)
        return step.forward.activations

    # The math path (CPU) keeps each layer's probabilities and dropout mask: heads x sequence^2 per row.
    assert activations(256, fused=False) / activations(128, fused=False) > 2.4
    # CUDA's memory-efficient kernel keeps one log-sum-exp per row instead: activations grow linearly.
    assert 1.9 < activations(256, fused=True) / activations(128, fused=True) < 2.1
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # the kernel is swapped back


def measured_forward_activations(model: torch.nn.Module, batch: int, sequence: int) -> int:
    """The activation bytes PyTorch's memory tracker sees at the peak of a real CPU forward pass (after one step)."""
    torch.manual_seed(0)
    model.train()
    ids = torch.randint(0, 500, (batch, sequence))
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    tracker = mem_tracker_class()()
    tracker.track_external(model, optimizer)
    with tracker:
        model(input_ids=ids, labels=ids)
    return _phase(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]).activations


LLAMA = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


def test_causal_lms_with_grouped_query_attention_are_simulated_with_their_lm_head_and_logits() -> None:
    step = simulate_step(LLAMA, "causal-lm", 4, 64)
    model = LlamaForCausalLM(LLAMA)
    assert step.parameters == tensor_bytes(list(model.parameters()))  # the LM head included
    assert step.forward.activations > 4 * 64 * 500 * 4  # the float32 logits are part of the peak
    # Without attention dropout the CPU runs a fused attention kernel too: simulated with it, the forward peak of
    # activations is within 2 % of what PyTorch's memory tracker measures on the real CPU model (GQA: key/value
    # heads serve two query heads each, and only they are kept for the backward pass, not copies per query head).
    for batch, sequence in [(2, 16), (4, 128)]:
        simulated = simulate_step(LLAMA, "causal-lm", batch, sequence, fused_attention=True).forward.activations
        measured = measured_forward_activations(LlamaForCausalLM(LLAMA), batch, sequence)
        assert abs(simulated / measured - 1) < 0.02, (batch, sequence, simulated, measured)
    fused = [simulate_step(LLAMA, "causal-lm", 4, n, fused_attention=True).forward.activations for n in (128, 256)]
    assert 1.9 < fused[1] / fused[0] < 2.1


# Llama-3.2-1B's shape: 16 blocks of width 2048, SwiGLU of 8192, 32 query heads of 64, the embedding tied to the LM head.
LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "head_dim": 64, "tie_word_embeddings": True}  # fmt: skip
BF16 = 2  # bytes per element


def llama_parameters(config: LlamaConfig) -> int:
    """A Llama's parameters counted by hand: the token embedding (also the LM head when tied, else one more
    vocabulary x width matrix); per block the query and output projections (width x width), the key and value
    projections (width x key/value heads x head size), the SwiGLU's three matrices and two RMSNorm weights; the
    final RMSNorm."""
    width, kv_width = config.hidden_size, config.num_key_value_heads * config.head_dim
    block = 2 * width * width + 2 * width * kv_width + 3 * width * config.intermediate_size + 2 * width
    head = 0 if config.tie_word_embeddings else config.vocab_size * width
    return config.vocab_size * width + head + config.num_hidden_layers * block + width


def test_a_1b_llama_with_grouped_query_attention_is_estimated_smaller_under_fsdp2_on_8_gpus() -> None:
    batch, sequence, devices = 4, 2048, 8
    tokens, layers, width, vocab = batch * sequence, 16, 2048, LLAMA_1B["vocab_size"]
    configs = {heads: LlamaConfig(**LLAMA_1B, num_key_value_heads=heads) for heads in (8, 32)}  # GQA; plain MHA

    def simulate(config: LlamaConfig) -> StepSimulation:  # as memopt estimate does for bf16-true on CUDA
        return simulate_step(config, "causal-lm", batch, sequence, dtype=torch.bfloat16, fused_attention=True)

    steps = {heads: simulate(config) for heads, config in configs.items()}  # on the meta device: nothing allocated
    peaks = {heads: device_peak(step, "fsdp2", devices, "adamw", "cuda") for heads, step in steps.items()}

    numels = {heads: llama_parameters(config) for heads, config in configs.items()}
    assert numels[8] == 1_235_814_400  # Llama-3.2-1B's 1.24B
    assert numels[32] - numels[8] == layers * 2 * width * (32 - 8) * 64  # the key and value projections
    for heads, step in steps.items():
        assert sum(step.trainable_numels) == numels[heads]
        assert step.parameters == BF16 * numels[heads] and step.optimizer == 2 * BF16 * numels[heads]  # 2 moments
        assert step.outside_blocks == BF16 * (vocab * width + width)  # the embedding, which is the LM head, once
    assert peaks[8]["parameters"] < peaks[32]["parameters"] and peaks[8]["optimizer"] < peaks[32]["optimizer"]

    # The attention keeps its keys and values for the backward pass, one per key/value head (the flash kernel
    # reads GQA's heads as they are), give or take the kernels' few scalar outputs.
    kv_activations = layers * 2 * tokens * (32 - 8) * 64 * BF16
    for phase in ("forward", "backward"):
        less = getattr(steps[32], phase).activations - getattr(steps[8], phase).activations
        assert abs(less - kv_activations) < 1024, (phase, less, kv_activations)
    assert peaks[8]["peak"] < peaks[32]["peak"]

    # The logits, by what half the vocabulary adds to one block's step: the bf16 logits, the loss's float32 copy and
    # its float32 log-probabilities (kept for the backward pass, which starts with two float32 gradients of them).
    sizes = (vocab, vocab // 2)  # (large enough that both peaks are at the loss)
    one_block = [simulate(LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": 1, "vocab_size": v})) for v in sizes]
    logits = tokens * (sizes[0] - sizes[1])
    assert one_block[0].forward.activations - one_block[1].forward.activations == logits * (BF16 + 4 + 4)
    assert one_block[0].backward.activations - one_block[1].backward.activations == logits * 4
    assert one_block[0].backward.temporaries - one_block[1].backward.temporaries == logits * 2 * 4

    # The per-device peak, bounded by hand. At least: this device's shards of the bf16 parameters and AdamW
    # moments; the float32 log-probabilities and the two gradients the backward pass starts with; and per block and
    # token the bf16 tensors it must keep: the input of the q/k/v projections, q, k and v, the attention output,
    # the MLP's input, its gate and up projections and the down projection's input. At most: every parameter,
    # gradient and moment unsharded, each block keeping twice that, every logits copy of both passes at once.
    for heads in steps:
        block_floor = tokens * BF16 * (4 * width + 2 * heads * 64 + 3 * LLAMA_1B["intermediate_size"])
        floor = 3 * BF16 * numels[heads] // devices + tokens * vocab * (4 + 8) + layers * block_floor
        ceiling = 4 * BF16 * numels[heads] + tokens * vocab * (BF16 + 4 + 4 + 8) + 2 * layers * block_floor
        assert floor < peaks[heads]["peak"] < ceiling, (heads, floor, peaks[heads], ceiling)


def test_sentence_classification_is_simulated_with_its_own_head() -> None:
    from transformers import BertForSequenceClassification

    sentence = simulate_step(CONFIG, "sequence-classification", 4, 64)
    assert sentence.parameters == tensor_bytes(list(BertForSequenceClassification(CONFIG).parameters()))
    assert sentence.forward.activations > 0


def test_eight_bit_state_formula_matches_bitsandbytes() -> None:
    params = [torch.nn.Parameter(torch.randn(300, 100)), torch.nn.Parameter(torch.randn(50))]
    optimizer = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    real = sum(tensor_bytes([v]) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    assert optimizer_state_bytes([p.numel() for p in params], "adamw8bit") == real
    assert optimizer_state_bytes([30000, 50], "adamw") == 8 * 30050
    assert optimizer_step_temporaries([30000, 50], "adamw8bit", "cpu") == 5 * 4 * 30000
    with pytest.raises(ValueError, match="Unknown optimizer 'adam9'"):
        optimizer_state_bytes([1], "adam9")


def test_strategies_shard_what_they_promise() -> None:
    step = simulate_step(CONFIG, "token-classification", 4, 32)
    single = per_device_peak(step, "single", 1)
    ddp = per_device_peak(step, "ddp", 2)
    assert ddp["strategy buffers"] == step.gradients and ddp["peak"] == single["peak"] + step.gradients
    zero = {stage: per_device_peak(step, stage, 4) for stage in ("zero1", "zero2", "zero3")}
    assert zero["zero1"]["optimizer"] == step.optimizer // 4
    assert zero["zero2"]["peak"] < zero["zero1"]["peak"] < single["peak"]
    gathered = step.outside_blocks + 2 * step.largest_block  # what a sharded device gathers whole
    assert (
        zero["zero3"]["parameters"]
        == per_device_peak(step, "fsdp2", 4)["parameters"]
        == step.parameters // 4 + gathered
    )
    assert per_device_peak(step, "fsdp2", 1)["peak"] == single["peak"]
    with pytest.raises(ValueError, match="cannot run on 2 devices"):
        per_device_peak(step, "single", 2)
    with pytest.raises(ValueError, match="Unknown strategy 'zero4'"):
        per_device_peak(step, "zero4", 2)  # type: ignore[arg-type]


def test_zero_keeps_a_float32_slice_and_buckets() -> None:
    step = simulate_step(CONFIG, "token-classification", 4, 32)
    buckets = zero_bucket_bytes(step, 1000, "cuda")
    assert buckets == 2 * 1000 * 4 and zero_bucket_bytes(step, 10**9, "cpu") == step.gradients
    zero2 = per_device_peak(step, "zero2", 2, zero_bucket_bytes=buckets)
    assert zero2["strategy buffers"] == step.parameters // 2 + buckets


def test_parse_size() -> None:
    assert parse_size("16GiB") == 16 * 2**30 and parse_size("512 MiB") == 512 * 2**20 and parse_size("80GB") == 80e9
    with pytest.raises(ValueError, match="--device_memory='lots'"):
        parse_size("lots")


def estimate_args(model_dir: Path, *extra: str) -> list[str]:
    return [
        "estimate",
        "--config",
        str(RECIPES / "ner/conll2003.yaml"),
        f"--model.model_name_or_path={model_dir}",
        "--data.batch_size=4",
        "--data.max_length=32",
        "--trainer.accelerator=cpu",
        *extra,
    ]


def test_memopt_estimate_prints_table_breakdown_and_recommendation(
    tiny_bert_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    main(
        estimate_args(
            tiny_bert_dir,
            "--config",
            str(RECIPES / "strategies/fsdp2.yaml"),
            "--trainer.devices=2",
            "--device_memory=1MiB",
        )
    )
    out = capsys.readouterr().out
    assert "batch 4 x 32 tokens per device" in out and "2 device(s) in all" in out
    for row in ("single / ddp", "zero1", "zero2", "zero3", "fsdp2 + checkpointing", "zero3 + checkpointing"):
        assert f"\n{row} " in out
    assert "Your setting: fsdp2 on 2 device(s)" in out
    assert "optimizer state (adamw, float32)" in out
    assert "Nothing fits 1 MiB per device" in out  # a 4 MiB model cannot fit in 1 MiB

    main(estimate_args(tiny_bert_dir, "--device_memory=1GiB"))
    assert "Cheapest setting that fits 1.0 GiB per device as configured: single / ddp" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device_memory=lots"], "--device_memory='lots' is not a size"),
        (["--trainer.strategy=xla"], "does not know --trainer.strategy='xla'"),
        (["--model.model_name_or_path=/no/such/model"], "--model.model_name_or_path='/no/such/model'"),
    ],
)
def test_memopt_estimate_errors_name_the_option(
    tiny_bert_dir: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(estimate_args(tiny_bert_dir, *extra))
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("memopt: error: ") and message in error
