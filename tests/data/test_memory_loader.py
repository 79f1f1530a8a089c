"""The minibatch loader: split, per-epoch order, resume position, and reading from a store."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scvi_scale.data import MemoryLoader, train_val_split
from scvi_scale.store.memory import MemoryStore


def _x(n=230, g=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.3, size=(n, g)).astype(np.float32)
    x[:, 0] += 1
    return sp.csr_matrix(x)


def test_split_matches_scvi_tools_rule():
    train, val = train_val_split(143, 0.9, seed=0, batch_size=128)
    assert (len(train), len(val)) == (128, 15)  # 129 -> a 1-cell last batch: moved to validation
    assert not set(train) & set(val) and len(set(train) | set(val)) == 143
    expected_val = np.sort(np.random.RandomState(0).permutation(143)[:15])
    assert np.array_equal(val, expected_val)


def test_every_cell_once_per_epoch_and_epochs_differ():
    x = _x()
    loader = MemoryLoader(x, np.zeros(230, int), np.arange(0, 230, 2), batch_size=32, seed=5)
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        rows = np.concatenate([b.rows_n for b in loader])
        assert sorted(rows) == list(range(0, 230, 2))
        orders.append(rows)
    assert not np.array_equal(orders[0], orders[1])


def test_batches_carry_exact_nonzero_and_counts():
    x = _x()
    x.data[x.indptr[3]] = 0.0  # a stored zero must not be listed as a count
    loader = MemoryLoader(x, np.arange(230) % 3, None, batch_size=50, shuffle=False)
    for b in loader:
        dense = torch.from_numpy(x[b.rows_n].toarray())
        assert torch.equal(b.x_ng, dense)
        rows, cols = b.nonzero
        assert torch.equal(torch.stack([rows, cols]), torch.stack(dense.nonzero(as_tuple=True)))
        assert torch.equal(b.batch_n, torch.from_numpy(b.rows_n % 3))


def test_reading_from_a_store_gives_the_same_batches():
    x = _x()
    store = MemoryStore(x, [f"g{i}" for i in range(30)])
    a = MemoryLoader(store.X, np.zeros(230, int), batch_size=40, seed=1)
    b = MemoryLoader(store, np.zeros(230, int), batch_size=40, seed=1)
    for ba, bb in zip(a, b, strict=True):
        assert np.array_equal(ba.rows_n, bb.rows_n) and torch.equal(ba.x_ng, bb.x_ng)
        assert all(torch.equal(u, v) for u, v in zip(ba.nonzero, bb.nonzero, strict=True))


def test_resume_position_and_mismatch():
    x = _x()
    loader = MemoryLoader(x, np.zeros(230, int), batch_size=32, seed=2)
    loader.set_epoch(3)
    full = [b.rows_n for b in loader]
    state = loader.state_dict(steps_done=4)
    again = MemoryLoader(x, np.zeros(230, int), batch_size=32, seed=2)
    again.load_state_dict(state)
    rest = [b.rows_n for b in again]
    assert len(rest) == len(full) - 4 and all(np.array_equal(u, v) for u, v in zip(rest, full[4:], strict=True))
    other = MemoryLoader(x, np.zeros(230, int), batch_size=16, seed=2)
    with pytest.raises(ValueError, match="batch size"):
        other.load_state_dict(state)
