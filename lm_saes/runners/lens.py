"""The terminal lens: a finished run and a piece of text -> per text token, the SAE's strongest latents.

`inspect_text(settings)` is what `lm-saes inspect RUN_DIR "TEXT"` calls. The text is tokenized as packing does
(`lm_saes.activation.packing`): no special tokens added, split into windows of the run's context size, each
after the model's BOS, so every token sits at a position the SAE was trained on. BOS, EOS and padding
positions (also those the text itself spells, such as `<eos>`) are left out: the SAE never saw them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lm_saes.config_base import BaseConfig, Device, check_device_available
from lm_saes.errors import UserInputError
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.sae import SparseAutoEncoder

NO_TEXT = "no text tokens; give some text"


class InspectSettings(BaseConfig):
    run_dir: str
    """A finished training run directory (status.json says ok); nothing is written into it."""
    text: str
    """The text to look at (the second positional argument)."""
    n_latents: int = Field(5, gt=0)
    """Latents shown per token: the strongest that fire there (fewer where fewer fire)."""
    device: Device | None = None
    """Where the model and the SAE run; None means the run's model.device."""


@dataclass(frozen=True)
class TokenLatents:
    """One text token and the latents that fire most on it."""

    position: int
    """Index among the text's tokens (BOS, EOS and padding not counted)."""
    token_id: int
    token: str
    latents: list[int]
    """The strongest firing latents, strongest first (at most n_latents)."""
    activations: list[float]
    n_fired: int
    """How many latents fire on this token (its L0)."""


def check_text(text: str) -> None:
    """Refuse a text that cannot hold a token (before any model is loaded)."""
    if not text.strip():
        raise UserInputError("text", text, NO_TEXT)


def text_windows(text: str, tokenizer: Any, context_size: int) -> list[torch.Tensor]:
    """(T,) token tensors: the text's tokens in windows of at most context_size, each after BOS, as packing
    would place them. Empty when the text has no tokens at all."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    room = context_size - len(head)
    return [torch.tensor(head + ids[i : i + room], dtype=torch.long) for i in range(0, len(ids), room)]


@torch.no_grad()
def top_latents(
    sae: SparseAutoEncoder, model: TransformerLensLanguageModel, windows: list[torch.Tensor], n_latents: int
) -> list[TokenLatents]:
    """Per text token of `windows`, the `n_latents` strongest latents of `sae` (in inference mode)."""
    hook, results = sae.cfg.hook_point_in, []
    with sae.inference():
        for tokens_T in windows:
            out = model.run_hooks(tokens_T[None], [hook])
            mask_T = out.mask_BT[0]
            x_ND = out.activations[hook][0][mask_T].to(sae.cfg.device, sae.cfg.dtype)
            latents_NS = sae.encode(x_ND).float().cpu()
            top = latents_NS.topk(min(n_latents, latents_NS.shape[1]), dim=1)
            token_ids = tokens_T[mask_T.cpu()].tolist()
            for values_K, indices_K, fired, token_id in zip(top.values, top.indices, (latents_NS > 0).sum(1), token_ids):
                keep = values_K > 0
                results.append(TokenLatents(len(results), token_id, model.tokenizer.decode([token_id]),
                                            indices_K[keep].tolist(), values_K[keep].tolist(), int(fired)))
    return results


def inspect_text(settings: InspectSettings, console: Console | None = None) -> list[TokenLatents]:
    """Run the text of `settings` through the run's model to its SAE's hook, encode, print a table per token;
    the rows. Raises UserInputError for a missing run or a text without text tokens."""
    from lm_saes.runners.run_loading import load_run_settings

    check_text(settings.text)
    run_dir = Path(settings.run_dir)
    train = load_run_settings(run_dir)
    device = settings.device or train.model.device
    check_device_available(device, "device")
    model = TransformerLensLanguageModel(train.model.model_copy(update={"device": device}))
    windows = text_windows(settings.text, model.tokenizer, train.activation_factory.context_size)
    if not any(model.text_mask(w).any() for w in windows):
        raise UserInputError("text", settings.text, NO_TEXT)
    sae = SparseAutoEncoder.from_pretrained(run_dir, device=device)
    rows = top_latents(sae, model, windows, settings.n_latents)
    console = console or Console(width=None if sys.stdout.isatty() else 140)  # a pipe gets no narrow wrap
    print_lens(rows, f"{run_dir}: {sae.cfg.hook_point_in}, {sae.cfg.d_sae:,} latents", console)
    return rows


def print_lens(rows: list[TokenLatents], title: str, console: Console) -> None:
    table = Table(title=title, title_justify="left")
    for name, justify in (("pos", "right"), ("token", "left"), ("L0", "right"), ("top latents (activation)", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        shown = "  ".join(f"{i} ({a:.2f})" for i, a in zip(row.latents, row.activations))
        table.add_row(str(row.position), escape(repr(row.token)), str(row.n_fired), shown or "[dim]none fire")
    console.print(table)
