"""The analysis on disk: `<run_dir>/analysis/features.safetensors` + `analysis.json`, versioned, never pickled.

`analysis.json` holds `format_version`, what was analysed (tokens, hook points, dead latents, whether logit
effects apply) and `token_strings`: the text of every token id that the tensors mention, so the dashboard
needs no tokenizer. Both files are written atomically; a reader refuses a format version it does not know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lm_saes.analysis.analyzer import FeatureAnalysis
from lm_saes.analysis.top_examples import PAD_TOKEN
from lm_saes.errors import UserInputError
from lm_saes.run_dir import atomic_path, write_json_atomic

FORMAT_VERSION = 1
ANALYSIS_DIR = "analysis"
FEATURES_FILE = "features.safetensors"
INFO_FILE = "analysis.json"


def token_strings(token_ids: torch.Tensor, tokenizer: Any) -> dict[str, str]:
    """{id: text} for every id in `token_ids` (PAD_TOKEN and -1 skipped), decoded one token at a time."""
    ids = torch.unique(token_ids.flatten()).tolist()
    return {str(i): tokenizer.decode([i]) for i in ids if i >= 0 and i != PAD_TOKEN}


def save_analysis(analysis: FeatureAnalysis, run_dir: Path, tokenizer: Any) -> Path:
    folder = run_dir / ANALYSIS_DIR
    id_tensors = [v for k, v in analysis.tensors.items() if k.endswith("tokens") or k.endswith("ids")]
    strings = token_strings(torch.cat([t.flatten().to(torch.int64) for t in id_tensors]), tokenizer)
    tensors = {k: v.contiguous() for k, v in analysis.tensors.items()}
    with atomic_path(folder / FEATURES_FILE) as tmp:
        save_file(tensors, str(tmp))
    # The JSON last: its presence with the right version says the pair is complete.
    write_json_atomic(folder / INFO_FILE, {"format_version": FORMAT_VERSION, **analysis.info, "token_strings": strings})
    return folder


def load_analysis(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(info, tensors) of `<run_dir>/analysis`, or a UserInputError saying what is missing or unknown."""
    info = read_analysis_info(run_dir)
    return info, load_file(str(run_dir / ANALYSIS_DIR / FEATURES_FILE))


def read_analysis_info(run_dir: Path) -> dict[str, Any]:
    """`analysis.json` after checking that both files exist and its format version is one this code reads."""
    folder = run_dir / ANALYSIS_DIR
    info_path, features_path = folder / INFO_FILE, folder / FEATURES_FILE
    if not info_path.exists() or not features_path.exists():
        raise UserInputError("run_dir", str(run_dir), f"no {ANALYSIS_DIR}/{INFO_FILE} and {FEATURES_FILE}; "
                             "run `lm-saes analyze RUN_DIR` first")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError("run_dir", str(run_dir), f"{ANALYSIS_DIR}/{INFO_FILE} is not valid JSON ({e})") from None
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise UserInputError("run_dir", str(run_dir), f"{ANALYSIS_DIR}/{INFO_FILE} has format_version {version!r}; "
                             f"this lm_saes reads version {FORMAT_VERSION} (re-run `lm-saes analyze`)")
    return info
