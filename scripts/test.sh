#!/usr/bin/env bash
# The README's test command: install everything, then run the whole suite once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python -m pytest "$@"
