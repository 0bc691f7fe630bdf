"""The base every config derives from: typed, strict, and inert when constructed."""

from __future__ import annotations

import sys
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


def cpu_has_bf16_matmul() -> bool:
    """Whether torch has fast bf16 matrix products on this CPU: oneDNN's bf16 kernels (on x86, AVX-512 or newer;
    native on CPUs with AVX-512 BF16 or AMX). Without them bf16 products are far slower than fp32 ones: on a
    2-core AMD EPYC with AVX2 only, (4,096 x 576) @ (576 x 4,608), an 8x SAE's encoder, took 17.5 s in bf16 and
    0.14 s in fp32 (120x), and SmolLM2's forward to block 6 5.5x as long."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: assume the products are fine
        return True


_WARNED_SLOW_DTYPE: set[str] = set()


def warn_if_slow_dtype(key: str, dtype: torch.dtype, device: str) -> None:
    """Print a warning (once per key and process) when `key`=bfloat16 puts matrix products on a CPU that has no
    bf16 kernels for them (`cpu_has_bf16_matmul`): the run is valid, only 5-120x slower than in float32."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu" or key in _WARNED_SLOW_DTYPE:
        return
    if cpu_has_bf16_matmul():
        return
    _WARNED_SLOW_DTYPE.add(key)
    from rich.console import Console

    Console(file=sys.stderr).print(
        f"[yellow]warning:[/] {key}=bfloat16 on a CPU without bf16 matrix kernels (torch's CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}): its matrix products run 5-120x slower than in float32 "
        f"here; use {key}=float32 on this machine", highlight=False)


Device = Annotated[str, BeforeValidator(parse_device)]

DType = Annotated[torch.dtype, BeforeValidator(parse_dtype), PlainSerializer(dtype_name, return_type=str)]


class BaseConfig(BaseModel):
    """Unknown keys are rejected; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True, frozen=False)
