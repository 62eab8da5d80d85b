"""CausalLMModule and CausalLMDataModule: prompt masking that matches the LM loss, a recipe run end to end with
structured pruning composed in, and the shrunk export reloading and generating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import PROJECT_ROOT, memopt
from helpers.models import copy_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_memopt import CausalLMDataModule, CausalLMModule, load_pretrained
from lightning_memopt.tasks.data import pack_examples
from lightning_memopt.tasks.readers import DataFormatError, read_prompts

PAIRS = [
    ("Translate to French: good morning", " bonjour"),
    ("What is the capital of Peru?", " Lima is the capital of Peru."),
    ("Name a colour.", " Blue."),
    ("Complete: the cat sat on the", " mat."),
]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    copy_tokenizer(folder)  # a real fast tokenizer (MiniLM's); it has a padding token and no end-of-sequence one
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_prompt_is_masked_exactly_where_the_lm_loss_would_count_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    data = CausalLMDataModule(train_file=str(train), tokenizer=str(tiny_llama_dir), batch_size=4)
    data.setup("fit")
    tokenizer = data.tokenizer
    for (prompt, completion), example in zip(PAIRS, data.datasets["train"], strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == prompt_ids + completion_ids
        assert example["labels"] == [-100] * len(prompt_ids) + completion_ids
    batch = next(iter(data.train_dataloader()))
    module = CausalLMModule(str(tiny_llama_dir))
    loss = module(**module.model_inputs(batch)).loss
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    counted = batch["labels"][:, 1:] != -100  # the shifted positions: only completions are trained on
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][counted], batch["labels"][:, 1:][counted])
    assert torch.allclose(loss, by_hand, atol=1e-5)


def test_packing_trains_on_full_rows_holding_the_examples_tokens_and_prompt_masks_in_order(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    data_file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS * 3])
    common = {"train_file": str(data_file), "tokenizer": str(tiny_llama_dir), "batch_size": 2}
    unpacked = CausalLMDataModule(**common, max_length=128)
    unpacked.setup("fit")
    examples = unpacked.datasets["train"].examples
    packed = CausalLMDataModule(**common, val_file=str(data_file), max_length=12, eval_max_length=128, pack=True)
    packed.setup("fit")
    rows = packed.datasets["train"].examples

    ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    assert max(len(example["input_ids"]) for example in examples) > 12  # a long example continues in the next row
    assert len(rows) == len(ids) // 12 and len(ids) % 12  # the last, partial row is dropped
    assert all(len(row["input_ids"]) == len(row["labels"]) == 12 and set(row["attention_mask"]) == {1} for row in rows)
    assert [token for row in rows for token in row["input_ids"]] == ids[: 12 * len(rows)]
    assert [label for row in rows for label in row["labels"]] == labels[: 12 * len(rows)]  # prompts still -100
    assert labels.count(-100) > 0
    batches = list(packed.train_dataloader())
    assert all(batch["input_ids"].shape[1] == 12 and batch["attention_mask"].all() for batch in batches)  # no padding
    assert sorted(row.tolist() for batch in batches for row in batch["input_ids"]) == sorted(
        row["input_ids"] for row in rows
    )
    assert packed.datasets["validation"].examples == examples  # validation is scored per example, not packed


def test_packing_data_too_short_for_one_row_names_max_length(tiny_llama_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    data = CausalLMDataModule(train_file=str(train), tokenizer=str(tiny_llama_dir), max_length=64, pack=True)
    with pytest.raises(ValueError, match=r"hold \d+ tokens, less than one row of --data.max_length=64; lower"):
        data.setup("fit")
    with pytest.raises(ValueError, match="An example has 2 tokens but 1 labels"):
        pack_examples([[1, 2]], [[1]], length=1)


def test_plain_texts_are_trained_on_whole_and_a_file_without_the_columns_is_named(tmp_path: Path) -> None:
    rows = read_prompts(write_jsonl(tmp_path / "t.jsonl", [{"text": "all of it"}]))
    assert rows[0].prompt == "" and rows[0].completion == "all of it"
    with pytest.raises(DataFormatError, match=r"no column 'text' \(--data.text_column\).*columns are \['body'\]"):
        read_prompts(write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}]))


def test_the_recipe_fine_tunes_with_structured_pruning_and_the_shrunk_export_generates(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS * 8]
    train, val = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "val.jsonl", rows[:8])
    recipes = PROJECT_ROOT / "recipes"
    args = ["fit", "--config", str(recipes / "causal-lm/smollm2-alpaca.yaml"),
            "--config", str(recipes / "causal-lm/own-data.yaml"),
            "--config", str(recipes / "pruning/structured-50.yaml"),
            f"--model.model_name_or_path={tiny_llama_dir}", f"--data.train_file={train}", f"--data.val_file={val}",
            "--model.learning_rate=0.001", "--data.batch_size=4", "--data.max_length=64", "--trainer.max_steps=10",
            "--trainer.val_check_interval=10", "--trainer.enable_progress_bar=false"]  # fmt: skip
    memopt(args, cwd=tmp_path)
    metrics = (tmp_path / "runs/causal-lm/logs/version_0/metrics.csv").read_text()
    assert "val_perplexity" in metrics and "sparsity" in metrics
    checkpoint = tmp_path / "runs/causal-lm/checkpoints/last.ckpt"
    memopt(["export", f"--ckpt_path={checkpoint}", "--output_dir=shrunk", "--shrink=true"], cwd=tmp_path)
    model = load_pretrained(tmp_path / "shrunk")
    assert model.config.intermediate_size == 32  # half the SwiGLU neurons cut out
    assert sum(p.numel() for p in model.model.layers.parameters()) < 0.75 * sum(
        p.numel() for p in LlamaForCausalLM.from_pretrained(tiny_llama_dir).model.layers.parameters()
    )
    prompt = torch.tensor([[101, 2054, 2003]])
    assert model.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_memopt_estimate_reads_the_causal_lm_recipe(tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning_memopt.cli import main

    main(["estimate", "--config", str(PROJECT_ROOT / "recipes/causal-lm/smollm2-alpaca.yaml"),
          f"--model.model_name_or_path={tiny_llama_dir}", "--data.max_length=64", "--config",
          str(PROJECT_ROOT / "recipes/strategies/fsdp2.yaml"), "--trainer.devices=2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "batch 8 x 64 tokens per device" in out and "Your setting: fsdp2 on 2 device(s)" in out
