#!/usr/bin/env bash
# Build, once, a venv holding the real `sae-lens` (6.x) and `eai-sparsify` (1.x), and print its python's path.
#   bash scripts/saelens_venv.sh        -> /root/.cache/lm_saes/saelens-venv/bin/python
# sae-lens 6 needs transformer-lens<4, which clashes with ours (>=4.3), so it cannot share .venv; the
# interop tests (tests/test_interop_saelens.py, tests/test_interop_sparsify.py) run it as a subprocess. Where: $LM_SAES_SAELENS_VENV, else
# ~/.cache/lm_saes/saelens-venv. A marker file is written last, so a half-built venv is rebuilt from scratch.
set -euo pipefail
V="${LM_SAES_SAELENS_VENV:-$HOME/.cache/lm_saes/saelens-venv}"
MARKER="$V/.lm_saes_complete"
if [ ! -f "$MARKER" ]; then
    PYTHON=${PYTHON:-python3}
    rm -rf "$V"
    mkdir -p "$(dirname "$V")"
    "$PYTHON" -m venv "$V" >&2
    # torch in the same command and exactly pinned: pip then takes the CPU wheel on local disk, where
    # sae-lens alone would pull a multi-GB CUDA build.
    "$V/bin/python" -m pip --disable-pip-version-check -q install \
        torch==2.13.0 'sae-lens>=6,<7' 'transformer-lens<4' >&2
    "$V/bin/python" -c 'import sae_lens' >&2
    touch "$MARKER"
fi
# Added later than sae-lens, so a venv built before gets it too; it shares sae-lens's torch and transformers.
SPARSIFY_MARKER="$V/.lm_saes_sparsify_complete"
if [ ! -f "$SPARSIFY_MARKER" ]; then
    "$V/bin/python" -m pip --disable-pip-version-check -q install torch==2.13.0 'eai-sparsify>=1.3,<2' >&2
    "$V/bin/python" -c 'import sparsify' >&2
    touch "$SPARSIFY_MARKER"
fi
echo "$V/bin/python"
