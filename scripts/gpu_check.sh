#!/usr/bin/env bash
# GPU check: what a CUDA machine says about the SAE training step, in under 5 minutes, as one table.
#
# 1. The CUDA-relevant tests, at most 60 s each: tests/test_cuda.py on cuda (the sparse steps of relu, jumprelu,
#    batchtopk and topk against the dense reference, and a short bf16 autocast run of each), plus part of the
#    bf16 autocast matrix (tests/test_variant_training.py, on the CPU: a quick guard).
# 2. At most 170 s: scripts/bench_train.py --only steps on device=cuda, median of 3 steps: the trainer's own
#    SAE step (loss, backward, fused Adam, per-step metrics) at d_model 2048, expansion 8x/32x/128x, batch
#    4096, for relu, jumprelu, topk and batchtopk, dense and sparse path, fp32 and bf16 autocast: tokens/s,
#    the ratio to the variant's dense fp32 step, and MFU = executed FLOPs / time / the GPU's dense bf16 peak
#    (looked up by device name; PEAK_TFLOPS=... overrides). Executed FLOPs: a dense step's five products
#    (10 x batch x d_model x d_sae); a sparse step's dense encoder forward plus four products over the
#    selected latents.
#
#   bash scripts/gpu_check.sh            # PY=... picks the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: torch ($PY) sees no CUDA device; nothing measured" >&2
    exit 2
fi
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k cuda
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_variant_training.py -k "bfloat16 and (relu or topk)" -x
timeout 170 "$PY" scripts/bench_train.py --only steps --device cuda --d-model 2048 --widths 8 32 128 \
    --batch 4096 --steps 3 --act-fns relu jumprelu topk batchtopk --amp float32 bfloat16 \
    ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"}
