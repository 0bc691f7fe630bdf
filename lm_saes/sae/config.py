"""SAEConfig: the shape and kind of a sparse autoencoder (or transcoder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import Field, field_validator

from lm_saes.config_base import BaseConfig, Device, DType
from lm_saes.sae.activation_functions import ACTIVATION_FUNCTIONS

CONFIG_FILE = "config.json"


class SAEConfig(BaseConfig):
    hook_point_in: str
    """The hook the SAE reads, e.g. `blocks.6.hook_resid_post`."""
    hook_point_out: str | None = None
    """The hook it reconstructs; None or equal to hook_point_in is an SAE, anything else a transcoder."""
    d_model: int | None = Field(None, gt=0)
    """The model's hidden size; None means "take it from the model" (the runner fills it in and checks it)."""
    expansion_factor: int = Field(8, gt=0)
    act_fn: str = "relu"
    dtype: DType = torch.float32
    device: Device = "cpu"

    @field_validator("act_fn")
    @classmethod
    def _known_act_fn(cls, value: str) -> str:
        if value not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"unknown activation function; allowed: {', '.join(ACTIVATION_FUNCTIONS)}")
        return value

    @property
    def hook_point_target(self) -> str:
        return self.hook_point_out or self.hook_point_in

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_target != self.hook_point_in

    @property
    def d_sae(self) -> int:
        if self.d_model is None:
            raise ValueError("d_model is not set yet; it is taken from the model when the SAE is built")
        return self.d_model * self.expansion_factor

    def save_hyperparameters(self, save_path: str | os.PathLike[str]) -> Path:
        """Write `config.json` (atomically) into `save_path`, creating the folder if needed."""
        from lm_saes.run_dir import write_json_atomic

        path = Path(save_path) / CONFIG_FILE
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> "SAEConfig":
        return cls.model_validate(json.loads((Path(path) / CONFIG_FILE).read_text()))
