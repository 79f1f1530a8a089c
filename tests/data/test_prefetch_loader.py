"""The prefetching store loader: exact minibatches from any store, deterministic order, bounded memory, clean
shutdown, resume, and per-stage timings in the training metrics. (CPU only: the CUDA staging path needs a GPU.)"""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_scale.config import TrainConfig
from scvi_scale.data import train_val_split
from scvi_scale.data.prefetch import StoreLoader, StoreReadError, auto_block_size
from scvi_scale.data.sampler import BlockSampler
from scvi_scale.model import VAE, ModelConfig
from scvi_scale.store import MemoryStore, read_h5ad
from scvi_scale.store.convert import convert
from scvi_scale.train.loop import TrainingInterrupted, fit

KW = {"block_size": 16, "buffer_blocks": 4, "seed": 1}


def _store(n=900, g=40, seed=0) -> MemoryStore:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.3, 3.0, size=(n, g))).astype(np.float32)
    x[:, 0] += 1
    return MemoryStore(sp.csr_matrix(x), [f"g{i}" for i in range(g)], source="<test store>")


@pytest.fixture(scope="module")
def zarr_pair(small_atlas: Path, tmp_path_factory):
    """The 600-cell atlas as a Zarr store (many small shards) and in memory."""
    out = tmp_path_factory.mktemp("zarr") / "small.zarr"
    zs = convert([small_atlas], out, batch_key="batch", memory_budget_bytes=2048 * 48, progress=False)
    return zs, read_h5ad(small_atlas)


def _check_batches(batches, x: sp.csr_matrix, codes: np.ndarray, rows: np.ndarray) -> None:
    seen = np.concatenate([b.rows_n for b in batches])
    assert np.array_equal(np.sort(seen), rows), "every served row exactly once"
    for b in batches:
        dense = torch.from_numpy(x[b.rows_n].toarray())
        assert b.x_ng.dtype == torch.float32 and torch.equal(b.x_ng, dense)
        assert torch.equal(torch.stack(b.nonzero), torch.stack(dense.nonzero(as_tuple=True)))
        assert torch.equal(b.batch_n, torch.from_numpy(codes[b.rows_n]))


def test_batches_equal_the_store_rows_in_the_sampler_order():
    store = _store()
    codes = np.arange(store.n_obs) % 3
    rows, _ = train_val_split(store.n_obs, 0.9, 0, 64)
    loader = StoreLoader(store, codes, rows, 64, **KW)
    loader.set_epoch(2)
    batches = list(loader)
    _check_batches(batches, store.X, codes, rows)
    sampler = BlockSampler(rows, 16, 4, 64, seed=1)
    sampler.set_epoch(2)
    assert len(batches) == len(loader) == len(sampler)
    assert all(np.array_equal(b.rows_n, r) for b, r in zip(batches, sampler, strict=True))


def test_zarr_store_gives_the_same_batches_as_memory(zarr_pair):
    zs, mem = zarr_pair
    codes, _ = mem.batch_codes("batch")
    rows, _ = train_val_split(mem.n_obs, 0.9, 0, 50)
    a = list(StoreLoader(zs, codes, rows, 50, **KW))
    b = list(StoreLoader(mem, codes, rows, 50, **KW))
    _check_batches(a, mem.X, codes, rows)
    assert all(np.array_equal(u.rows_n, v.rows_n) and torch.equal(u.x_ng, v.x_ng) for u, v in zip(a, b, strict=True))
    assert 16 <= auto_block_size(zs) <= 4096


def test_tiledb_store_gives_the_same_batches(tmp_path):
    pytest.importorskip("tiledb")
    from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata
    from scvi_scale.store.tiledb_store import TileDBStore

    adata = make_anndata(SyntheticSpec(n_cells=400, n_genes=50, seed=2))
    ts = TileDBStore.from_anndata(adata, tmp_path / "a.tiledb", chunk_rows=150)
    codes = adata.obs["batch"].cat.codes.to_numpy().astype(np.int64)
    rows, _ = train_val_split(400, 0.9, 0, 32)
    _check_batches(list(StoreLoader(ts, codes, rows, 32, **KW)), sp.csr_matrix(adata.X), codes, rows)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_in_one_process_see_every_cell_once(world_size):
    store = _store()
    codes = np.zeros(store.n_obs, dtype=np.int64)
    rows, _ = train_val_split(store.n_obs, 0.9, 0, 32)
    loaders = [StoreLoader(store, codes, rows, 32, rank=r, world_size=world_size, **KW) for r in range(world_size)]
    per_rank = [[b.rows_n for b in ld] for ld in loaders]
    assert {len(b) for b in per_rank} == {len(loaders[0])}
    assert np.array_equal(np.sort(np.concatenate([np.concatenate(b) for b in per_rank])), rows)


def test_device_path_assembles_coo_that_densifies_to_the_rows(monkeypatch):
    """The CUDA path minus the streams: COO parts (int32 indices) made dense by ``densify`` on the CPU here."""
    import scvi_scale.data.prefetch as prefetch

    class _CpuStager:
        def __init__(self, device):
            pass

        def stage(self, hb):
            assert hb.batch is None and hb.coo[1].dtype == torch.int32
            return prefetch.densify(hb, "cpu")

    monkeypatch.setattr(prefetch, "_DeviceStager", _CpuStager)
    store = _store()
    codes = np.arange(store.n_obs) % 4
    rows, _ = train_val_split(store.n_obs, 0.9, 0, 32)
    loader = StoreLoader(store, codes, rows, 32, device="cuda", pin_memory=False, **KW)
    _check_batches(list(loader), store.X, codes, rows)


def test_order_is_the_same_for_any_thread_count_and_budget():
    store = _store()
    codes = np.zeros(store.n_obs, dtype=np.int64)
    runs = []
    for threads, budget in ((1, 1 << 30), (3, 1 << 30), (2, 40_000)):
        loader = StoreLoader(store, codes, None, 32, num_threads=threads, memory_budget_bytes=budget, **KW)
        loader.set_epoch(1)
        runs.append(np.concatenate([b.rows_n for b in loader]))
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


def test_memory_budget_bounds_bytes_in_flight():
    store = _store(n=2000)
    codes = np.zeros(store.n_obs, dtype=np.int64)
    # a piece here is 64 rows (~10 kB of CSR), a minibatch 32 dense rows x 40 genes (~15 kB with its indices)
    tight = StoreLoader(store, codes, None, 32, num_threads=2, memory_budget_bytes=40_000, **KW)
    roomy = StoreLoader(store, codes, None, 32, num_threads=2, memory_budget_bytes=1 << 30, **KW)
    for loader in (tight, roomy):
        for _ in loader:
            time.sleep(0.002)  # a slow consumer lets the threads run ahead as far as the budget allows
    assert 0 < tight.max_inflight_bytes <= 40_000
    assert roomy.max_inflight_bytes > 40_000, "with room, the loader reads ahead"


class _Failing:
    """A store whose reads fail from some row on (a damaged chunk, a lost connection)."""

    def __init__(self, inner: MemoryStore, bad_row: int, delay: float = 0.0) -> None:
        self.inner, self.bad_row, self.delay = inner, bad_row, delay
        self.n_obs, self.n_vars, self.source = inner.n_obs, inner.n_vars, "s3://bucket/broken.zarr"

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        time.sleep(self.delay)
        if start <= self.bad_row < stop:
            raise OSError("connection reset")
        return self.inner.read_range(start, stop)


def test_reader_error_surfaces_with_store_and_rows(monkeypatch):
    base = threading.active_count()
    store = _Failing(_store(), bad_row=500)
    loader = StoreLoader(store, np.zeros(store.n_obs, dtype=np.int64), None, 32, **KW)
    with pytest.raises(StoreReadError, match=r"s3://bucket/broken\.zarr: reading rows \[\d+, \d+\) failed \(OSError"):
        for _ in loader:
            pass
    _wait_for_threads(base)


def _wait_for_threads(base: int, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while threading.active_count() > base and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    assert threading.active_count() == base, [t.name for t in threading.enumerate()]


def test_break_and_consumer_errors_stop_the_threads():
    store = _store()
    codes = np.zeros(store.n_obs, dtype=np.int64)
    base = threading.active_count()
    loader = StoreLoader(store, codes, None, 32, num_threads=3, **KW)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    _wait_for_threads(base)
    with pytest.raises(ZeroDivisionError):
        for _ in loader:
            raise ZeroDivisionError
    _wait_for_threads(base)
    assert len(list(loader)) == len(loader), "the loader still works after an aborted pass"


def test_ctrl_c_while_waiting_for_data_does_not_hang():
    slow = _Failing(_store(), bad_row=-1, delay=0.3)
    base = threading.active_count()
    loader = StoreLoader(slow, np.zeros(slow.n_obs, dtype=np.int64), None, 32, **KW)
    timer = threading.Timer(0.1, _thread.interrupt_main)  # Ctrl-C while the consumer waits for the first reads
    t0 = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    timer.join()
    assert loader.timings()["idle_s"] == 0.0, "interrupted before any minibatch arrived"
    assert time.monotonic() - t0 < 3.0  # the running reads finish (0.3 s each), nothing else is waited for
    _wait_for_threads(base)


def test_resume_same_and_other_world_size():
    store = _store()
    codes = np.zeros(store.n_obs, dtype=np.int64)
    full = StoreLoader(store, codes, None, 32, **KW)
    full.set_epoch(1)
    want = [b.rows_n for b in full]
    again = StoreLoader(store, codes, None, 32, **KW)
    again.load_state_dict(full.state_dict(5))
    rest = [b.rows_n for b in again]
    assert all(np.array_equal(u, v) for u, v in zip(rest, want[5:], strict=True)) and len(rest) == len(want) - 5
    # two ranks take 3 steps, then one rank carries on: every cell once
    ranks = [StoreLoader(store, codes, None, 32, rank=r, world_size=2, **KW) for r in range(2)]
    done = [b.rows_n for ld in ranks for b in list(ld)[:3]]
    solo = StoreLoader(store, codes, None, 32, **KW)
    solo.load_state_dict(ranks[0].state_dict(3))
    seen = np.concatenate(done + [b.rows_n for b in solo])
    assert np.array_equal(np.sort(seen), np.arange(store.n_obs))


def test_fit_logs_stage_timings(tmp_path, zarr_pair):
    zs, mem = zarr_pair
    codes, cats = mem.batch_codes("batch")
    tr, va = train_val_split(zs.n_obs, 0.9, 0, 64)
    train = StoreLoader(zs, codes, tr, 64, **KW)
    val = StoreLoader(zs, codes, va, 64, shuffle=False)
    cfg = TrainConfig(progress=False, seed=0)
    torch.manual_seed(0)
    model = VAE(zs.n_vars, len(cats), ModelConfig(n_hidden=16, n_latent=4))
    result = fit(model, train, val, cfg, 2, run_dir=tmp_path)
    assert result.global_step == 2 * len(train)
    m = pd.read_csv(tmp_path / "metrics.csv")
    for col in ("perf/read_s", "perf/decode_s", "perf/assemble_s", "perf/h2d_s", "perf/idle_s", "perf/step_s"):
        assert m[col].notna().all() and (m[col] >= 0).all(), col
    assert (m["perf/read_s"] > 0).all() and m["validation/elbo"].notna().all()
    assert set(train.timings()) == {"read_s", "decode_s", "assemble_s", "h2d_s", "idle_s"}


class _CtrlCAt:
    """Forwards to a loader; Ctrl-C before minibatch ``at`` of epoch ``epoch`` of a run that started fresh."""

    def __init__(self, inner: StoreLoader, epoch: int, at: int) -> None:
        self.inner, self.stop_epoch, self.at = inner, epoch, at

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, e: int) -> None:
        self.inner.set_epoch(e)

    def state_dict(self, steps_done: int) -> dict:
        return self.inner.state_dict(steps_done)

    def load_state_dict(self, s: dict) -> None:
        self.inner.load_state_dict(s)

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if self.inner.epoch == self.stop_epoch and i == self.at:
                raise KeyboardInterrupt
            yield b


def test_fit_interrupted_and_resumed_equals_uninterrupted(tmp_path, zarr_pair):
    zs, mem = zarr_pair
    codes, cats = mem.batch_codes("batch")
    tr, _ = train_val_split(zs.n_obs, 0.9, 0, 64)
    cfg = TrainConfig(progress=False, seed=0, n_epochs_kl_warmup=2)

    def run(wrap=None, resume=None, run_dir=None):
        torch.manual_seed(0)
        model = VAE(zs.n_vars, len(cats), ModelConfig(n_hidden=16, n_latent=4))
        loader = StoreLoader(zs, codes, tr, 64, **KW)
        fit(model, wrap(loader) if wrap else loader, None, cfg, 3, run_dir=run_dir, resume_from=resume)
        return model.state_dict()

    straight = run()
    base = threading.active_count()
    with pytest.raises(TrainingInterrupted) as info:
        run(wrap=lambda ld: _CtrlCAt(ld, 1, 3), run_dir=tmp_path)
    _wait_for_threads(base)
    resumed = run(resume=info.value.checkpoint, run_dir=tmp_path)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


class _Counting:
    """A store that records the rows each read covers."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner, self.reads = inner, []
        self.n_obs, self.n_vars, self.source = inner.n_obs, inner.n_vars, inner.source
        self.X = inner.X  # row pointers: exact piece sizes

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        self.reads.append((start, stop))
        return self.inner.read_range(start, stop)


def _piece_reads(loader: StoreLoader, epoch: int) -> list[tuple[int, int]]:
    """The ``read_range`` calls that read the first piece of ``epoch``."""
    from scvi_scale.data.pipeline import _split_spans

    srt = np.sort(loader.sampler.rows[loader.sampler.plan_of(epoch).pieces[0].positions()])
    spans = [sp for group in _split_spans(srt, loader.num_threads, 2 * loader.block_size) for sp in group]
    return [(int(srt[i]), int(srt[j - 1]) + 1) for i, j in spans]


def test_next_epoch_first_piece_is_read_while_the_epoch_ends():
    codes = np.zeros(900, dtype=np.int64)
    base = threading.active_count()
    plain = _Counting(_store())  # no plan_epochs: each pass reads its own pieces only
    ahead = _Counting(_store())
    loaders = {"plain": StoreLoader(plain, codes, None, 32, **KW), "ahead": StoreLoader(ahead, codes, None, 32, **KW)}
    loaders["ahead"].plan_epochs(3)
    for epoch in range(3):
        batches = {}
        for name, loader in loaders.items():
            loader.set_epoch(epoch)
            batches[name] = [b.rows_n for b in loader]
        assert all(np.array_equal(u, v) for u, v in zip(*batches.values(), strict=True)), "the same minibatches"
        # the next epoch's first piece is in already (and was not read again), nothing more; nothing for epoch 3
        extra = _piece_reads(loaders["ahead"], epoch + 1) if epoch + 1 < 3 else []
        t0 = time.monotonic()
        while len(ahead.reads) < len(plain.reads) + len(extra) and time.monotonic() - t0 < 20:
            time.sleep(0.01)
        time.sleep(0.1)  # time to read anything further (there must be nothing)
        assert sorted(ahead.reads) == sorted(plain.reads + extra)
    loaders["ahead"].close()
    _wait_for_threads(base)


def test_a_pass_started_ahead_is_dropped_when_another_pass_comes():
    store = _store()
    codes = np.zeros(store.n_obs, dtype=np.int64)
    base = threading.active_count()
    loader = StoreLoader(store, codes, None, 32, **KW)
    loader.plan_epochs(10)
    list(loader)  # epoch 0; epoch 1's first piece is read ahead
    loader.set_epoch(4)  # not the epoch read ahead
    want = StoreLoader(store, codes, None, 32, **KW)
    want.set_epoch(4)
    assert all(np.array_equal(a.rows_n, b.rows_n) for a, b in zip(loader, want, strict=True))
    # resumed mid-epoch 5 (epoch 5 was read ahead from its start): the resume position wins
    full = StoreLoader(store, codes, None, 32, **KW)
    full.set_epoch(5)
    loader.load_state_dict(full.state_dict(3))
    want.set_epoch(5)
    assert all(np.array_equal(a.rows_n, b.rows_n) for a, b in zip(loader, list(want)[3:], strict=True))
    loader.close()
    _wait_for_threads(base)
    without = StoreLoader(store, codes, None, 32, **KW)  # no plan_epochs: nothing beyond the pass
    list(without)
    _wait_for_threads(base)


def test_object_storage_gets_more_reader_threads_by_default():
    from scvi_scale.config import Config, config_from_dict
    from scvi_scale.data.prefetch import DEFAULT_THREADS, REMOTE_THREADS, default_threads

    local, remote = _store(), _store()
    remote.source = "s3://bucket/atlas.zarr"
    assert (default_threads(local), default_threads(remote)) == (DEFAULT_THREADS, REMOTE_THREADS)
    assert Config().data.loader_threads is None
    with pytest.raises(ValueError, match="loader_threads"):
        config_from_dict({"data": {"loader_threads": 0}})


def test_a_pass_started_ahead_stays_within_the_budget_and_ends_with_the_loader():
    import gc

    store = _store()
    codes = np.zeros(store.n_obs, dtype=np.int64)
    base = threading.active_count()
    roomy = StoreLoader(store, codes, None, 32, **KW)
    roomy.plan_epochs(5)
    list(roomy)
    assert roomy._warm is not None and roomy.max_inflight_bytes <= roomy.memory_budget_bytes
    del roomy  # never closed: dropping the loader stops the pass it started ahead
    gc.collect()
    _wait_for_threads(base)
    # a budget smaller than a piece (the loader still runs, one piece at a time): no piece is read early
    tight = StoreLoader(store, codes, None, 32, memory_budget_bytes=4_000, **KW)
    tight.plan_epochs(5)
    list(tight)
    assert tight._warm is None
    closed = StoreLoader(store, codes, None, 32, **KW)
    closed.plan_epochs(5)
    closed.close()  # no more reading ahead until plan_epochs again
    list(closed)
    assert closed._warm is None
    _wait_for_threads(base)
