"""The base every config derives from: typed, strict, and inert when constructed."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(value: Any) -> torch.dtype:
    """Accept a torch.dtype, "float32" or "torch.float32" (the walkthrough writes the latter)."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"unknown dtype; allowed: {', '.join(_DTYPES)} (optionally prefixed with 'torch.')")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_device(value: Any) -> str:
    """Accept what torch.device accepts ("cpu", "cuda", "cuda:1", "mps"), keeping the string."""
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError("not a torch device; use cpu, cuda, cuda:N or mps") from None
    return str(value)


def check_device_available(device: str, key: str) -> None:
    """Raise UserInputError (naming `key`) unless this machine can run on `device`.

    Configs accept any device name (a run trained on a GPU is read back on a laptop); runners call this before
    they put anything on the device, so a missing GPU is one line rather than torch's assertion."""
    from lm_saes.errors import UserInputError

    kind = torch.device(device)
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UserInputError(key, device, f"CUDA is not available on this machine ({why}); use cpu")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise UserInputError(key, device, f"only {torch.cuda.device_count()} GPU(s) are visible: cuda:0.."
                                 f"cuda:{torch.cuda.device_count() - 1}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(key, device, "MPS (Apple GPU) is not available on this machine; use cpu")


Device = Annotated[str, BeforeValidator(parse_device)]

DType = Annotated[torch.dtype, BeforeValidator(parse_dtype), PlainSerializer(dtype_name, return_type=str)]


class BaseConfig(BaseModel):
    """Unknown keys are rejected; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True, frozen=False)
