import torch

from lm_saes.activation.buffer import ShuffleBuffer


def _stream(n_rows: int, chunk: int):
    ids = torch.arange(n_rows)
    for start in range(0, n_rows, chunk):
        part = ids[start : start + chunk]
        yield {"tokens": part, "acts": part.float().unsqueeze(1).repeat(1, 3)}


def _run(seed: int, n_rows: int = 1000, capacity: int = 256, batch: int = 64, chunk: int = 37) -> list[torch.Tensor]:
    buffer = ShuffleBuffer(capacity, batch, torch.Generator().manual_seed(seed))
    out = []
    for rows in _stream(n_rows, chunk):
        out.extend(buffer.push(rows))
    out.extend(buffer.flush())
    for b in out:  # columns stay aligned
        assert torch.equal(b["acts"][:, 0].long(), b["tokens"])
    return [b["tokens"] for b in out]


def test_every_row_comes_out_exactly_once() -> None:
    batches = _run(seed=0)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    assert all(len(b) == 64 for b in batches[:-1]) and 0 < len(batches[-1]) <= 64


def test_same_seed_same_order_other_seed_other_order() -> None:
    a, b, c = _run(seed=1), _run(seed=1), _run(seed=2)
    assert torch.equal(torch.cat(a), torch.cat(b))
    assert not torch.equal(torch.cat(a), torch.cat(c))


def test_batches_mix_rows_from_across_the_buffer() -> None:
    first = _run(seed=3)[0]
    # The first batch is drawn from the first 256 rows, uniformly: it is neither the first 64 rows nor sorted.
    assert first.max() >= 128 and first.min() < 128
    assert not torch.equal(first, first.sort().values)


def test_buffer_smaller_than_a_batch_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="buffer_size"):
        ShuffleBuffer(10, 64, torch.Generator())
