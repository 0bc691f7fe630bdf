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


Device = Annotated[str, BeforeValidator(parse_device)]

DType = Annotated[torch.dtype, BeforeValidator(parse_dtype), PlainSerializer(dtype_name, return_type=str)]


class BaseConfig(BaseModel):
    """Unknown keys are rejected; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True, frozen=False)
