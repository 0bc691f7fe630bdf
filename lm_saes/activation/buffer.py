"""Re-batching of activation rows: a seeded shuffle buffer, and a plain FIFO when shuffling is off.

The shuffle buffer writes rows into a fixed-size store. Once it is full, each batch is `batch_size` slots
drawn at random from the whole store; the next incoming rows are written into exactly those slots. Each
batch is a uniform sample of everything in the buffer, mixing documents and positions, at O(batch_size)
copies per batch: the store is never re-concatenated.

Both keep their whole state in tensors (`state_dict`), so a training checkpoint can hold the exact position
of the stream and resume it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Rows = dict[str, torch.Tensor]
"""Column name -> (n, ...) tensor; every column has the same first dimension."""


def _n_rows(rows: Rows | None) -> int:
    return 0 if rows is None else len(next(iter(rows.values())))


def _concat(a: Rows | None, b: Rows) -> Rows:
    return b if a is None or _n_rows(a) == 0 else {k: torch.cat([a[k], b[k].to(a[k].device)]) for k in a}


def _slice(rows: Rows, start: int, stop: int | None = None) -> Rows:
    return {k: v[start:stop] for k, v in rows.items()}


class FifoBatcher:
    """Cut variable-size chunks into batches of batch_size in arrival order (the last may be smaller)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._pending: Rows | None = None

    def push(self, rows: Rows) -> Iterator[Rows]:
        self._pending = _concat(self._pending, rows)
        while _n_rows(self._pending) >= self.batch_size:
            assert self._pending is not None
            batch, self._pending = _slice(self._pending, 0, self.batch_size), _slice(self._pending, self.batch_size)
            yield batch

    def flush(self) -> Iterator[Rows]:
        if _n_rows(self._pending):
            assert self._pending is not None
            batch, self._pending = self._pending, None
            yield batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"pending.{k}": v for k, v in (self._pending or {}).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pending = {k.removeprefix("pending."): v for k, v in state.items() if k.startswith("pending.")}
        self._pending = pending or None


class ShuffleBuffer:
    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator) -> None:
        if capacity < batch_size:
            raise ValueError(f"buffer_size ({capacity}) must be at least batch_size ({batch_size})")
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator
        self._store: Rows | None = None
        self._free_N: torch.Tensor = torch.arange(capacity)
        """Slots that may be written next; the buffer is full when none are left."""
        self._pending: Rows | None = None
        """Rows that arrived but have no slot yet (at most one forward pass's worth)."""

    def _draw(self, n_slots: int, among_N: torch.Tensor | None = None) -> torch.Tensor:
        size = self.capacity if among_N is None else len(among_N)
        perm = torch.randperm(size, generator=self.generator, device=self.generator.device)[:n_slots].cpu()
        return perm if among_N is None else among_N[perm]

    def push(self, rows: Rows) -> Iterator[Rows]:
        """Add rows; yield every batch that becomes available."""
        if self._store is None:
            self._store = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
                           for k, v in rows.items()}
        self._pending = _concat(self._pending, rows)
        while _n_rows(self._pending):
            assert self._pending is not None
            n_write = min(len(self._free_N), _n_rows(self._pending))
            slots = self._free_N[:n_write]
            for key, column in self._store.items():
                column[slots.to(column.device)] = self._pending[key][:n_write].to(column.device)
            self._free_N, self._pending = self._free_N[n_write:], _slice(self._pending, n_write)
            if len(self._free_N) == 0:
                drawn = self._draw(self.batch_size)
                self._free_N = drawn  # set before yielding: the state is consistent at every yield
                yield self._gather(drawn)

    def flush(self) -> Iterator[Rows]:
        """Yield what is left, in random batches (the last one may be smaller)."""
        while self._store is not None:
            occupied = torch.ones(self.capacity, dtype=torch.bool)
            occupied[self._free_N] = False
            remaining = torch.nonzero(occupied).squeeze(1)
            if len(remaining) == 0:
                return
            drawn = self._draw(min(self.batch_size, len(remaining)), remaining)
            self._free_N = torch.cat([self._free_N, drawn])
            yield self._gather(drawn)

    def _gather(self, slots: torch.Tensor) -> Rows:
        assert self._store is not None
        return {k: v[slots.to(v.device)] for k, v in self._store.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"free": self._free_N.clone(), "generator": self.generator.get_state()}
        state.update({f"store.{k}": v for k, v in (self._store or {}).items()})
        state.update({f"pending.{k}": v for k, v in (self._pending or {}).items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._free_N = state["free"].clone()
        self.generator.set_state(state["generator"])
        store = {k.removeprefix("store."): v.clone() for k, v in state.items() if k.startswith("store.")}
        pending = {k.removeprefix("pending."): v for k, v in state.items() if k.startswith("pending.")}
        self._store, self._pending = store or None, pending or None
