#!/usr/bin/env bash
# GPU check: what a CUDA machine says about the SAE training step and the command line, in under 8 minutes
# (about 3 on an H200), as tables.
#
# 0. The machine: GPU name, driver, torch and CUDA versions.
# 1. The CUDA-relevant tests, at most 60 s each: tests/test_cuda.py on cuda (the sparse steps of relu, jumprelu,
#    batchtopk and topk against the dense reference, and a short bf16 autocast run of each), plus part of the
#    bf16 autocast matrix (tests/test_variant_training.py, on the CPU: a quick guard).
# 2. At most 170 s: scripts/bench_train.py --only steps on device=cuda, median of 3 steps: the trainer's own
#    SAE step (loss, backward, fused Adam, per-step metrics) at d_model 2048, expansion 8x/32x/128x, batch
#    4096, for relu, jumprelu, topk and batchtopk, dense and sparse path, fp32 and bf16 autocast: tokens/s,
#    the ratio to the variant's dense fp32 step, and MFU = executed FLOPs / time / the GPU's dense bf16 peak
#    (looked up by device name; PEAK_TFLOPS=... overrides). Executed FLOPs: a dense step's five products
#    (10 x batch x d_model x d_sae); a sparse step's dense encoder forward plus four products over the
#    selected latents. Then where the sparse TopK step's time goes, phase by phase.
# 3. At most 60 s: scripts/bench_train.py --only syncs: the host syncs in one trainer step (8x), per act_fn and
#    path, by call site (torch's sync debug mode).
# 4. At most 120 s: scripts/cli_smoke.py: `lm-saes train +sae=relu_8x|topk_8x|jumprelu_8x device=cuda` end to end
#    on a tiny random Llama and a synthetic corpus (offline): exit status, seconds, EV and L0 of each.
#
# A failing part does not stop the rest; the exit status is non-zero when any part failed.
#
#   bash scripts/gpu_check.sh            # PY=... picks the interpreter (default .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: torch ($PY) sees no CUDA device; nothing measured" >&2
    exit 2
fi
failed=()
part() {  # part NAME SECONDS COMMAND...: run one part under a time limit, note it if it fails
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$@" || failed+=("$name (exit $?)")
    echo "=== $name took $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
"$PY" -c 'import torch, platform; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}, {torch.cuda.get_device_name()}")'
part "tests on cuda" 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k cuda
part "bf16 autocast tests (CPU)" 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_variant_training.py \
    -k "bfloat16 and (relu or topk)" -x
part "step bench" 170 "$PY" scripts/bench_train.py --only steps --device cuda --d-model 2048 --widths 8 32 128 \
    --batch 4096 --steps 3 --act-fns relu jumprelu topk batchtopk --amp float32 bfloat16 \
    ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"}
part "host syncs" 60 "$PY" scripts/bench_train.py --only syncs --device cuda --d-model 2048 --widths 8 \
    --batch 4096 --act-fns relu jumprelu topk batchtopk
part "lm-saes train on cuda" 120 "$PY" scripts/cli_smoke.py --device cuda
if ((${#failed[@]})); then
    printf 'gpu_check.sh: failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu_check.sh: every part passed"
