"""A seeded shuffle buffer for activation rows that never re-concatenates itself per batch.

Rows are written into a fixed-size store. Once it is full, each batch is `batch_size` slots drawn at
random from the whole store; the next incoming rows are written into exactly those slots. Each output
batch is therefore a uniform sample of everything in the buffer, mixing documents and positions, and the
work per batch is O(batch_size) copies plus one random permutation of slot indices.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Rows = dict[str, torch.Tensor]
"""Column name -> (n, ...) tensor; every column has the same first dimension."""


class ShuffleBuffer:
    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator) -> None:
        if capacity < batch_size:
            raise ValueError(f"buffer_size ({capacity}) must be at least batch_size ({batch_size})")
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator
        self._store: Rows | None = None
        self._free_N: torch.Tensor = torch.arange(capacity)
        """Slots that may be written next; the buffer is full when none are left."""

    def _allocate(self, rows: Rows) -> Rows:
        return {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in rows.items()}

    def _draw(self, n_slots: int, among_N: torch.Tensor | None = None) -> torch.Tensor:
        size = self.capacity if among_N is None else len(among_N)
        perm = torch.randperm(size, generator=self.generator, device=self.generator.device)[:n_slots].cpu()
        return perm if among_N is None else among_N[perm]

    def push(self, rows: Rows) -> Iterator[Rows]:
        """Add rows; yield every batch that becomes available."""
        if self._store is None:
            self._store = self._allocate(rows)
        n_rows = next(iter(rows.values())).shape[0]
        start = 0
        while start < n_rows:
            n_write = min(len(self._free_N), n_rows - start)
            slots = self._free_N[:n_write].to(next(iter(self._store.values())).device)
            for key, column in self._store.items():
                column[slots] = rows[key][start : start + n_write].to(column.device)
            self._free_N = self._free_N[n_write:]
            start += n_write
            if len(self._free_N) == 0:
                drawn = self._draw(self.batch_size)
                yield self._gather(drawn)
                self._free_N = drawn

    def flush(self) -> Iterator[Rows]:
        """Yield what is left, shuffled, in batches (the last one may be smaller)."""
        if self._store is None:
            return
        occupied = torch.ones(self.capacity, dtype=torch.bool)
        occupied[self._free_N] = False
        remaining = torch.nonzero(occupied).squeeze(1)
        order = self._draw(len(remaining), remaining)
        for start in range(0, len(order), self.batch_size):
            yield self._gather(order[start : start + self.batch_size])
        self._free_N = torch.arange(self.capacity)

    def _gather(self, slots: torch.Tensor) -> Rows:
        assert self._store is not None
        return {k: v[slots.to(v.device)] for k, v in self._store.items()}
