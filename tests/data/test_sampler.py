"""Block sampler: every cell once per epoch across ranks, equal steps, fresh epochs, exact resume, re-partition."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_scale.data import train_val_split
from scvi_scale.data.sampler import BlockSampler, step_sizes


def _ranks(rows, world_size, epoch=0, **kw):
    kw = {"block_size": 16, "buffer_blocks": 4, "batch_size": 32, "seed": 3, **kw}
    samplers = [BlockSampler(rows, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers


def _batches(samplers):
    return [list(s) for s in samplers]


def _entropy(labels, k):
    p = np.bincount(labels, minlength=k) / labels.size
    p = p[p > 0]
    return -(p * np.log(p)).sum()


# a split with gaps (rows are not contiguous on disk), sizes that do and do not divide evenly
ROWS = {
    "split": train_val_split(1000, 0.9, seed=0, batch_size=32)[0],
    "odd": np.arange(997),
    "fold": np.arange(4 * 64 + 4),  # 4 ranks x (2 x 32 + 1): last minibatches of 1 cell must fold
}


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_cell_once_across_ranks_and_equal_steps(name, world_size):
    rows = ROWS[name]
    samplers = _ranks(rows, world_size, epoch=2)
    per_rank = _batches(samplers)
    steps = {len(b) for b in per_rank}
    assert steps == {len(samplers[0])}, "every rank takes the same number of steps"
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert seen.size == rows.size and np.array_equal(np.sort(seen), rows)
    sizes = [len(x) for b in per_rank for x in b]
    assert min(sizes) >= 3 and max(sizes) <= 32 + 3  # no 1-2 cell minibatch (BatchNorm), none much bigger


def test_step_rule():
    assert step_sizes([64, 64], 32) == [[32, 32], [32, 32]]
    assert step_sizes([65, 64], 32) == [[32, 33], [32, 32]]  # rank 1 would get an empty 3rd step: fold
    assert step_sizes([70, 69], 32) == [[32, 32, 6], [32, 32, 5]]
    assert step_sizes([70, 69], 32, drop_last=True) == [[32, 32], [32, 32]]
    assert step_sizes([2], 32) == [[2]]  # one tiny epoch still runs
    with pytest.raises(ValueError, match="ranks"):
        step_sizes([1, 0], 32)


def test_epochs_differ_in_order_boundaries_and_rank_shares():
    rows = ROWS["split"]
    s = BlockSampler(rows, 16, 4, 32, seed=3)
    bounds = [s.layout(e).bounds for e in range(4)]
    assert len({tuple(b[1:3]) for b in bounds}) > 1, "block boundaries move between epochs"
    a = _ranks(rows, 2, epoch=0)
    b = _ranks(rows, 2, epoch=1)
    assert not np.array_equal(np.concatenate(list(a[0])), np.concatenate(list(b[0])))
    share0, share1 = set(np.concatenate(list(a[0]))), set(np.concatenate(list(b[0])))
    assert share0 != share1, "rank 0 does not keep the same cells every epoch"


def test_deterministic_from_seed_and_epoch_only():
    rows = ROWS["odd"]
    one = [np.concatenate(b) for b in _batches(_ranks(rows, 2, epoch=5))]
    two = [np.concatenate(b) for b in _batches(_ranks(rows, 2, epoch=5))]
    other = [np.concatenate(b) for b in _batches(_ranks(rows, 2, epoch=5, seed=4))]
    assert all(np.array_equal(u, v) for u, v in zip(one, two, strict=True))
    assert not np.array_equal(one[0], other[0])


def test_blocks_are_runs_of_consecutive_rows():
    rows = np.arange(0, 4000, 2)  # every other row served
    s = BlockSampler(rows, 64, 4, 128, seed=0)
    cells = np.concatenate(list(s))
    buffer = np.sort(cells[: 64 * 4])  # the first buffer: 4 blocks of 64 served rows
    runs = np.flatnonzero(np.diff(buffer) != 2).size + 1
    assert runs <= 5  # 4 blocks (and the random offset may cut one of them at a seam)


def test_no_shuffle_keeps_row_order_split_contiguously():
    rows = ROWS["split"]
    per_rank = [np.concatenate(b) for b in _batches(_ranks(rows, 2, shuffle=False))]
    assert np.array_equal(np.concatenate(per_rank), rows)


def test_drop_last_serves_full_minibatches_only():
    per_rank = _batches(_ranks(ROWS["odd"], 4, drop_last=True))
    assert {len(b) for b in per_rank} == {len(per_rank[0])}
    assert all(len(x) == 32 for b in per_rank for x in b)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_after_k_steps_gives_the_remaining_batches(world_size):
    rows, k = ROWS["split"], 7
    full = _batches(_ranks(rows, world_size, epoch=3))
    state = _ranks(rows, world_size, epoch=3)[0].state_dict(k)
    assert state["step"] == k and state["segments"] == [[world_size, k]]
    resumed = _ranks(rows, world_size, epoch=0)
    for r, s in enumerate(resumed):
        s.load_state_dict(state)
        assert s.epoch == 3 and len(s) == len(full[r])
        rest = list(s)
        assert len(rest) == len(full[r]) - k
        assert all(np.array_equal(u, v) for u, v in zip(rest, full[r][k:], strict=True))
        s.start_pass()
        assert len(list(s)) == len(full[r]), "after the resumed pass, the epoch starts from its beginning"


def _consumed(per_rank, k):
    return [x for b in per_rank for x in b[:k]]


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (4, 3)])
def test_world_size_change_repartitions_the_rest_once(old, new):
    rows, k = ROWS["split"], 5
    before = _ranks(rows, old, epoch=1)
    consumed = _consumed(_batches(before), k)
    state = before[0].state_dict(k)
    after = _ranks(rows, new)
    for s in after:
        s.load_state_dict(state)
    rest = _batches(after)
    assert len({len(b) for b in rest}) == 1, "the new ranks take equal steps"
    assert all(len(s) == k + len(rest[0]) for s in after)  # steps counted from the epoch's start
    seen = np.concatenate(consumed + [x for b in rest for x in b])
    assert seen.size == rows.size and np.array_equal(np.sort(seen), rows)


def test_nested_world_size_changes():
    rows = ROWS["odd"]
    first = _ranks(rows, 2, epoch=4)
    consumed = _consumed(_batches(first), 3)
    second = _ranks(rows, 1)
    second[0].load_state_dict(first[0].state_dict(3))
    consumed += list(second[0])[:4]
    state = second[0].state_dict(3 + 4)
    assert state["segments"] == [[2, 3], [1, 4]]
    third = _ranks(rows, 4)
    for s in third:
        s.load_state_dict(state)
    rest = _batches(third)
    seen = np.concatenate(consumed + [x for b in rest for x in b])
    assert np.array_equal(np.sort(seen), rows)
    # the same chain resumed at the same world size skips exactly the steps taken
    again = _ranks(rows, 1)
    again[0].load_state_dict(state)
    assert all(np.array_equal(u, v) for u, v in zip(list(again[0]), list(second[0])[4:], strict=True))


def test_refuses_a_state_from_another_setup():
    rows = ROWS["split"]
    state = _ranks(rows, 1, epoch=1)[0].state_dict(2)
    with pytest.raises(ValueError, match="batch_size"):
        _ranks(rows, 1, batch_size=16)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="rows_digest"):
        _ranks(rows[1:], 1)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        _ranks(rows, 1)[0].load_state_dict({**state, "kind": "memory"})
    dl = _ranks(rows, 2, drop_last=True)[0].state_dict(1)
    with pytest.raises(ValueError, match="drop_last"):
        _ranks(rows, 1, drop_last=True)[0].load_state_dict(dl)


@pytest.mark.parametrize("batch_size", [128, 1024])
def test_batch_sorted_store_keeps_label_entropy(batch_size):
    """Worst case: 8 batches stored one after the other, each 50k cells. The loader's defaults at ~250 counts per
    cell: 512-row blocks, 128 blocks a buffer (a buffer is 65,536 cells, a sixth of the served cells)."""
    n, k = 400_000, 8
    labels = np.repeat(np.arange(k), n // k)
    rows = train_val_split(n, 0.9, seed=0, batch_size=batch_size)[0]
    s = BlockSampler(rows, 512, 128, batch_size, seed=0)
    ours = np.mean([_entropy(labels[b], k) for b in s])
    perm = np.random.default_rng(0).permutation(rows)
    iid = np.mean([_entropy(labels[perm[a : a + batch_size]], k) for a in range(0, perm.size, batch_size)])
    assert ours >= 0.95 * iid, (ours, iid)
    small = BlockSampler(rows, 512, 4, batch_size, seed=0)  # a small buffer is measurably worse: the test can fail
    assert np.mean([_entropy(labels[b], k) for b in small]) < 0.95 * iid
