#!/usr/bin/env bash
# Set up with the test dependencies and run the whole test suite (tiny models, plus the
# few tests marked real_model on the default model). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
bash scripts/setup.sh dev
exec "$py" -m pytest -q "$@"
