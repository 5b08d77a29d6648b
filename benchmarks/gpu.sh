#!/usr/bin/env bash
# Every benchmark at the paper's 448 px on one GPU: batch 32, bf16 autocast, channels_last,
# torch.compile off and on (compiled: plain and cra-smra only, to stay under 5 minutes), MFU
# against the H200's dense bf16 peak. Writes the tables to $OUT_FILE as well as stdout.
#
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --smoke    # (or SMOKE=1) a tiny CPU run of the same code paths
#
# Environment: PYTHON (default python), BACKBONES (default resnet50; e.g.
# resnet50,densenet161 if time allows), PEAK_TFLOPS (default 989, H200 bf16 dense),
# OUT_FILE (default benchmarks/results-<date>.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT_FILE=${OUT_FILE:-benchmarks/results-$(date +%Y%m%d-%H%M).md}

if [[ "$SMOKE" == 1 ]]; then
  args=(--device cpu --size 64 --batch 2 --throughput-batch 2 --backbones resnet10t
        --kinds plain,cra-smra,pmg --compile both --compile-kinds cra-smra
        --warmup 0 --iters 1 --rounds 1 --pipeline-images 4 --loader-workers 1
        --dtype bf16 --channels-last --peak-tflops "${PEAK_TFLOPS:-1}")
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  args=(--device cuda --size 448 --batch 32 --throughput-batch 32
        --backbones "${BACKBONES:-resnet50}" --compile both --compile-kinds plain,cra-smra
        --warmup 2 --iters 10 --rounds 5 --pipeline-images 128 --loader-workers 1,4,8,16
        --dtype bf16 --channels-last --peak-tflops "${PEAK_TFLOPS:-989}")
fi
# Compiled kernels are cached between runs; a rerun skips most of the compile time.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/crasmra-inductor}
time "$PY" benchmarks/run_all.py "${args[@]}" --output "$OUT_FILE"
echo "tables written to $OUT_FILE"
