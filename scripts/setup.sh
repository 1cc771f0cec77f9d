#!/usr/bin/env bash
# Install asyncengine (editable) into the current Python environment.
# Usage: bash scripts/setup.sh [extras]   e.g. "dev" for the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# The CPU build of torch first: with no torch installed, a plain 'torch' requirement
# would pull a multi-GB CUDA build. 2.13.0 satisfies the package's own range.
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install -q "torch==2.13.0"
fi
"$py" -m pip install -q -e ".${1:+[$1]}"
# Build the CPU attention op now (once per machine) rather than at the first engine start;
# without a C++ compiler the engine falls back to the torch path, so this never fails setup.
"$py" -c "from kernels import attention_cpu; attention_cpu.load()" \
  || echo "warning: the CPU attention op did not build; the engine will use the torch path" >&2
