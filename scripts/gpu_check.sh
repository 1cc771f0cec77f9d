#!/usr/bin/env bash
# One-shot check of the CUDA path (the engine on the Triton kernels), with no download:
# models are random weights built from configs (tiny ones for correctness, SmolLM2-135M's
# for speed).
#   1. the CUDA-marked tests: kernels (fp32 IEEE, bf16, row invariance), the contract's
#      row reductions (the CPU bits on CUDA), and the engine
#      (parity vs HF transformers on the same GPU: fp32 <= 1e-4, bf16 <= 0.05 nats;
#      needle, batch-size, chunked-prefill, prefix-cache and preemption invariance,
#      bitwise);
#   2. prefill-heavy and decode-heavy workloads, ours vs HF `generate` on the same GPU:
#      tokens/s and the ratio (bench/device_throughput.py), fp32 and bf16;
#   3. each op at SmolLM2's shapes, torch (cuBLAS for the linear layers) vs Triton.
# Usage:
#   bash scripts/gpu_check.sh                  # on a CUDA machine, <= 8 minutes (step timeouts)
#   bash scripts/gpu_check.sh --cpu-reduced    # anywhere: the same steps on CPU under the
#                                              # Triton interpreter, tiny sizes (the CUDA
#                                              # tests skip; proves the script end to end)
#   bash scripts/gpu_check.sh --fetch-wheels   # on a machine with pip access, beforehand:
#                                              # wheels of packages the GPU machine lacks
#                                              # (orjson, pytest-asyncio) into .whl/
#                                              # (git-ignored: name it in the device
#                                              # tool's `carry` so it travels)
# In the GPU mode, wheels found in .whl/ are installed into a private target first.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mode=${1:-gpu}
WHEELS=("orjson==3.13.0" "pytest-asyncio==1.5.0")

case "$mode" in
  --fetch-wheels)
    mkdir -p .whl
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0 ;;
  gpu|--cpu-reduced) ;;
  *) echo "usage: $0 [--cpu-reduced | --fetch-wheels]" >&2; exit 2 ;;
esac

if [ "$mode" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then  # built for the GPU machine's Python
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/asyncengine-site .whl/*.whl
  export PYTHONPATH=/tmp/asyncengine-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$(date +%s)
rc=0  # every step runs even when an earlier one fails; the exit status says if any did

if [ "$mode" = gpu ]; then
  # The compiled kernels, never the interpreter (tests/conftest.py defaults it to 1).
  export TRITON_INTERPRET=0
  "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
  "$py" -c "import triton; print('triton', triton.__version__)"
  echo "== 1. CUDA tests"
  timeout 150 "$py" -m pytest -q -m cuda -rs tests/kernels/test_matmul.py tests/test_triton_engine.py tests/test_row_reductions.py || rc=1
  echo "== 2. ours vs HF generate (SmolLM2-135M config, random weights)"
  timeout 270 "$py" bench/device_throughput.py --device cuda --config smollm2 --dtypes float32,bfloat16 || rc=1
  echo "== 3. kernels at SmolLM2 shapes, torch (cuBLAS) vs Triton"
  timeout 50 "$py" bench/kernels.py --repeats 10 || rc=1
else
  export TRITON_INTERPRET=1
  echo "== 1. CUDA tests (reduced: they must skip cleanly without a GPU)"
  timeout 300 "$py" -m pytest -q -m cuda -rs tests/kernels/test_matmul.py tests/test_triton_engine.py tests/test_row_reductions.py || rc=1
  echo "== 2. ours (Triton interpreter) vs HF generate on CPU, tiny config"
  timeout 300 "$py" bench/device_throughput.py --device cpu --config tiny --kernel-backend triton \
    --dtypes float32 --scale 0.03 --max-prompt-len 20 --new-tokens 2 || rc=1
fi
echo "gpu_check ($mode) done in $(( $(date +%s) - start )) s, status $rc"
exit $rc
