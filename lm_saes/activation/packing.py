"""Tokenize documents and pack them into full contexts, so that no position is spent on padding."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def pack_documents(
    texts: Iterable[str], tokenizer: Any, context_size: int, tokenize_batch: int = 64
) -> Iterator[torch.Tensor]:
    """Yield (context_size,) token tensors: BOS, then documents joined by EOS, split across contexts.

    A document longer than a context continues in the next one (which starts with its own BOS), so the
    only positions that carry no text are the BOS at each context's start and the EOS separators.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    room = context_size - len(head)
    if room <= 0:
        raise ValueError(f"context_size ({context_size}) leaves no room for text")
    pending: list[int] = []
    for chunk in _chunks(texts, tokenize_batch):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            if not ids:
                continue
            pending.extend(ids)
            if eos is not None:
                pending.append(eos)
            while len(pending) >= room:
                yield torch.tensor(head + pending[:room], dtype=torch.long)
                pending = pending[room:]
    # The ragged tail is dropped: a padded context would spend positions on nothing.


def batch_contexts(contexts: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """(B, T) stacks of `size` consecutive (T,) contexts (the last may hold fewer), read lazily."""
    batch: list[torch.Tensor] = []
    for context_T in contexts:
        batch.append(context_T)
        if len(batch) == size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        if text and text.strip():
            chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
