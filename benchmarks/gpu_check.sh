#!/usr/bin/env bash
# Every GPU check of the scale work (issue 6) in one run on one CUDA GPU: about 6-9 minutes on one H200.
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        # from anywhere; OUTDIR defaults to $OUT, else /tmp/lowrank-gpu-check
#
# Needs python3 with a CUDA build of torch, safetensors, click, tqdm, numpy and pytest (the H200 image has them;
# the package itself runs from this checkout through PYTHONPATH, nothing is installed). Writes to OUTDIR:
#   gpu.txt            nvidia-smi and torch's view of the device
#   tests.txt          the CUDA tests (pinned staging, batched SVD on the GPU against the CPU, TF32 restored) and the
#                      CPU-side pipeline / distributed / bf16 tests on this machine
#   gpu-bench.txt      the 7B-shaped run: a Llama-7B-shaped pair (32 blocks + embeddings, bf16, 13 GB per checkpoint,
#                      generated on the GPU under /tmp and deleted after) extracted at r=64 end to end (target: under
#                      60 s), resize and merge of the result on the GPU, then block 0 by the default and the exact SVD
#   RESULTS.md         benchmarks/RESULTS.md with its "gpu" section replaced by this run's (machine named)
# Each step is bounded by `timeout`; the script goes on after a failed step and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-/tmp/lowrank-gpu-check}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"; } 2>&1 | tee "$OUTDIR/gpu.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: stop"; exit 2; }

echo "== tests (CUDA ones included)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_pipeline.py tests/test_linalg_bf16.py \
    tests/test_distributed.py tests/test_sketch.py tests/test_memory.py 2>&1 | tee "$OUTDIR/tests.txt" || status=1

echo "== 7B-shaped extract, resize, merge on the GPU"
cp benchmarks/RESULTS.md "$OUTDIR/RESULTS.md" 2>/dev/null || true
timeout 420 "$PY" benchmarks/run.py --parts gpu --device cuda --work /tmp --output "$OUTDIR/RESULTS.md" --merge \
    2>&1 | tee "$OUTDIR/gpu-bench.txt" || status=1

echo "== done (status $status): $OUTDIR"
exit $status
