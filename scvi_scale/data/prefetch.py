"""The prefetching out-of-core loader: background threads read and decode the next blocks while the model trains.

Data path of one epoch on one rank (:class:`~scvi_scale.data.sampler.BlockSampler` decides what to read)::

    sampler plan: pieces (a buffer's shuffled cells) + minibatch sizes
      -> reader threads (``num_threads``): a piece's rows sorted, merged into row ranges across small gaps
         (rows of the other split), split into one task per thread; ``store.read_range`` per range, the rows
         asked for written into the piece's arrays (uint16 counts and columns where the store allows:
         :mod:`scvi_scale.data.piece`)                                                     [read, decode]
      -> assembler thread, in plan order: minibatch rows copied out of the loaded pieces
         -> dense float32 ``x_ng`` + ``nonzero`` (CPU), or pinned COO values/indices (CUDA)   [decode, assemble]
      -> bounded queue -> consumer (the training loop's thread); on CUDA, non-blocking copies on a side
         stream and densification on the device                                           [h2d, idle]

Minibatches come out in the sampler's order whatever the thread timing, so a seed gives the same batches for
any thread count. What is held: the piece minibatches are cut from, the next piece being read (one piece ahead:
see :mod:`scvi_scale.data.pipeline`), and up to ``QUEUE_BATCHES`` minibatches; so the loader's memory is the
same for a 100k-cell store as for a 100M-cell one. ``memory_budget_bytes`` bounds it further: pieces read or
being read (reserved exactly from the store's row pointers when it has them, else estimated from the rows read
so far) plus assembled minibatches not yet handed out. Read-ahead stops while the budget is full; when nothing
the consumer could free is in flight, the next piece or minibatch is let through even if it alone exceeds the
budget (``max_inflight_bytes`` records the peak).

Across epochs: after :meth:`StoreLoader.plan_epochs` (``fit`` calls it), the first piece of the next epoch is
read while the current epoch's last piece is consumed, so an epoch starts without waiting for its first read;
that pass is used only if the next iteration is that epoch from its start (otherwise it is dropped).

An exception in a thread is re-raised in the consumer, naming the store and the row range. Breaking out of the
iteration, an exception in the training step or Ctrl-C stop the threads: pending reads are cancelled, running
ones stop after their current ``read_range`` (a stop waits for at most one per thread).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scvi_scale.data.batch import Batch
from scvi_scale.data.piece import EntryDtypes, piece_bytes
from scvi_scale.data.pipeline import Pipeline, RangeReader, StoreReadError, release_free_memory
from scvi_scale.data.sampler import BlockSampler

__all__ = ["StoreLoader", "StoreReadError", "RangeReader", "auto_block_size", "default_threads"]

log = logging.getLogger(__name__)

BLOCK_ENTRIES = 131_072  # automatic block size: about two Zarr chunks (ENTRY_CHUNK) of stored counts per block
DEFAULT_BUFFER_BLOCKS = 128
DEFAULT_THREADS = 2
REMOTE_THREADS = 8  # object storage: a read mostly waits on the network, so more of them are kept in flight
DEFAULT_MEMORY_BUDGET = 1 << 30
UNSHUFFLED_BUFFER_BLOCKS = 4  # blocks per piece of an unshuffled pass (buffers only mix cells)
STAGES = ("read_s", "decode_s", "assemble_s", "h2d_s", "idle_s")


def auto_block_size(store: RangeReader) -> int:
    """Rows per block so a block holds about ``BLOCK_ENTRIES`` counts: a power of two in ``[16, 4096]``.

    A block smaller than a storage chunk decodes the whole chunk for a fraction of it, and every read call has
    a fixed cost (a ``ZarrStore.read_range`` took ~2.4 ms plus ~2 ms per 65,536 counts on the 2-core test
    machine: two chunks a block keep the fixed part near a third). Minibatch diversity depends on the number of
    blocks in a buffer, not their size, but a piece's memory grows with both (``buffer_blocks`` x
    ``BLOCK_ENTRIES`` x 8 bytes: 128 MB at the defaults). Density comes from the store's row pointers or
    ``nnz``, else from its first rows.
    """
    n = int(store.n_obs)
    if n == 0:
        return 16
    ptr = _store_indptr(store)
    nnz = getattr(store, "nnz", None)
    if ptr is not None:
        per_row = float(ptr[-1] - ptr[0]) / n
    elif isinstance(nnz, int | np.integer):
        per_row = float(nnz) / n
    else:
        per_row = store.read_range(0, min(n, 1024)).nnz / min(n, 1024)
    rows = BLOCK_ENTRIES / max(per_row, 1.0)
    return int(min(max(2 ** round(math.log2(rows)), 16), 4096))


def default_threads(store: Any) -> int:
    """Reader threads for ``store`` when the configuration leaves it open: ``REMOTE_THREADS`` for object storage
    (its ``source`` is a URL), else ``DEFAULT_THREADS``.

    Against moto's S3 server on the 2-core test machine 8 threads read ~20 % faster than 2 (the server's CPU,
    not latency, is the limit there); against a real bucket, with 10-100 ms a request, the number of reads in
    flight sets the pace, and waiting threads cost no CPU.
    """
    return REMOTE_THREADS if "://" in str(getattr(store, "source", "")) else DEFAULT_THREADS


def _store_indptr(store: Any) -> np.ndarray | None:
    """Row pointers when the store holds them in memory (exact reservations), else None."""
    x = getattr(store, "X", None)
    if sp.issparse(x):
        return np.asarray(x.indptr)
    ptr = getattr(type(store), "indptr", None)
    if ptr is not None:  # ZarrStore reads its indptr once (8 bytes per cell) for read_range anyway
        ptr = store.indptr
        return ptr if isinstance(ptr, np.ndarray) else None
    return None


class StoreLoader:
    """Block-shuffled minibatches read from a count store by background threads (a ``Loader`` for ``fit``).

    Parameters
    ----------
    store
        Anything with ``n_obs``, ``n_vars`` and ``read_range(start, stop) -> CSR`` (Zarr, TileDB, S3, memory).
    batch_codes
        Batch code of every store row, shape ``(n_obs,)``.
    rows
        The rows served (e.g. the training split), increasing; default all.
    batch_size
        Cells per minibatch (see :mod:`scvi_scale.data.sampler` for the last one).
    block_size
        Consecutive served rows read as one block; None: :func:`auto_block_size`.
    buffer_blocks, seed, rank, world_size, shuffle, drop_last
        As for :class:`~scvi_scale.data.sampler.BlockSampler`; without ``shuffle`` a buffer holds at most
        ``UNSHUFFLED_BUFFER_BLOCKS`` blocks (there is nothing to mix, and each piece read ahead is held whole).
    num_threads
        Reader threads (zarr, TileDB and scipy release the GIL while decoding).
    memory_budget_bytes
        Bound on the bytes in flight (see the module docstring).
    device
        None or CPU: minibatches are dense on the host. A CUDA device: minibatches arrive on it, densified there.
    pin_memory
        Stage host minibatches in pinned memory (default: when ``device`` is CUDA).
    """

    def __init__(
        self,
        store: RangeReader,
        batch_codes: np.ndarray,
        rows: np.ndarray | None = None,
        batch_size: int = 128,
        *,
        block_size: int | None = None,
        buffer_blocks: int = DEFAULT_BUFFER_BLOCKS,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        num_threads: int = DEFAULT_THREADS,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        device: str | torch.device | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        n_obs = int(store.n_obs)
        self.store = store
        self.source = str(getattr(store, "source", repr(store)))
        self.n_vars = int(store.n_vars)
        self.batch_codes = np.asarray(batch_codes)  # kept in its own (small) dtype; int64 per minibatch
        if self.batch_codes.dtype.kind not in "iu":
            raise ValueError(f"batch_codes must be integers, got {self.batch_codes.dtype}")
        if self.batch_codes.shape != (n_obs,):
            raise ValueError(f"batch_codes has shape {self.batch_codes.shape}; {self.source} has {n_obs} rows")
        rows = np.arange(n_obs) if rows is None else np.asarray(rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n_obs):
            raise IndexError(f"rows outside [0, {n_obs}) of {self.source}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        block_size = auto_block_size(store) if block_size is None else int(block_size)
        if not shuffle:  # nothing to mix: small pieces keep the read-ahead small (e.g. the validation pass)
            buffer_blocks = min(int(buffer_blocks), UNSHUFFLED_BUFFER_BLOCKS)
        self.sampler = BlockSampler(
            rows, block_size, buffer_blocks, batch_size, seed, rank, world_size, shuffle=shuffle, drop_last=drop_last
        )
        self.num_threads = int(num_threads)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self._indptr = _store_indptr(store)
        ptr = self._indptr
        self.nnz_per_row = float(ptr[-1] - ptr[0]) / n_obs if ptr is not None and n_obs else None  # for the Pipeline
        self.entry_dtypes = EntryDtypes.for_store(store)  # pieces in memory: uint16 counts and columns when they fit
        self.times = dict.fromkeys(STAGES, 0.0)
        self.max_inflight_bytes = 0
        self.prefetch_next_epoch = bool(shuffle)  # training passes; an unshuffled pass is usually run once
        self.epoch_limit: int | None = None  # read ahead into epochs below this only (set by plan_epochs)
        self._warm: tuple[int, Pipeline, weakref.finalize] | None = None  # the next epoch's pass, started early

    # -- the Loader protocol ----------------------------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        return self.sampler.n_obs

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def block_size(self) -> int:
        return self.sampler.block_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def plan_epochs(self, max_epochs: int) -> None:
        """Say that epochs up to ``max_epochs - 1`` will be iterated, in order: while an epoch's last piece is
        consumed, the first piece of the next one (below ``max_epochs``) is read, so the next pass starts with
        no wait. Without this call a loader never reads past the pass it serves. Call :meth:`close` when done
        (``fit`` does both)."""
        self.epoch_limit = int(max_epochs)

    def close(self) -> None:
        """Stop a pass started ahead for the next epoch (training ended early, or the loader is done), which
        holds a piece and threads until then, and read ahead no more until :meth:`plan_epochs` is called again.
        A loader dropped without it stops that pass when it is garbage-collected."""
        self.epoch_limit = None
        self._drop_warm()

    def _drop_warm(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            warm[2].detach()
            warm[1].close()

    def state_dict(self, steps_done: int) -> dict:
        return self.sampler.state_dict(steps_done)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def timings(self) -> dict[str, float]:
        """Seconds per stage since construction: ``read_s``, ``decode_s``, ``assemble_s`` (summed over the
        background threads, so they can exceed wall time), ``h2d_s`` (consumer thread: issuing copies and
        densifying on the device) and ``idle_s`` (consumer thread: waiting for the next minibatch)."""
        return dict(self.times)

    def __iter__(self) -> Iterator[Batch]:
        stager = _DeviceStager(self.device) if self.device.type == "cuda" else None
        pipe = None
        try:
            pipe = self._claim_warm()
            plan = self.sampler.start_pass()
            if not plan.batch_sizes:
                return
            if pipe is None:
                pipe = Pipeline(weakref.proxy(self), self.sampler.rows, plan.pieces, plan.batch_sizes)
            pipe.release()
            warm_from = self._warm_step(plan) if self._may_read_ahead(self.sampler.epoch + 1) else None
            for k in range(len(plan.batch_sizes)):
                t0 = time.perf_counter()
                hb = pipe.get()
                t1 = time.perf_counter()
                if k == warm_from:  # the last piece is loaded: this pass reads no more, the next epoch's may
                    self._start_warm(self.sampler.epoch + 1, pipe)
                    t1 = time.perf_counter()
                batch = stager.stage(hb) if stager is not None else hb.batch
                self.times["idle_s"] += t1 - t0
                self.times["h2d_s"] += time.perf_counter() - t1
                yield batch
        finally:
            if pipe is not None:
                pipe.close()
                self.max_inflight_bytes = max(self.max_inflight_bytes, pipe.budget.peak)
                release_free_memory()

    # -- reading across the epoch boundary ----------------------------------------------------------------------------
    def _may_read_ahead(self, epoch: int) -> bool:
        return self.prefetch_next_epoch and self.epoch_limit is not None and epoch < self.epoch_limit

    @staticmethod
    def _warm_step(plan: Any) -> int:
        """The first minibatch that lies in the plan's last piece (reading is over from there on)."""
        last_start = sum(p.size for p in plan.pieces[:-1])
        ends = np.cumsum(plan.batch_sizes)
        return int(np.searchsorted(ends, last_start, side="right"))

    def _start_warm(self, epoch: int, current: Pipeline) -> None:
        """Start ``epoch``'s pass, held after its first piece, if that piece fits the memory budget beside what
        the ``current`` pass still holds (its last piece and queued minibatches: that only shrinks now)."""
        self._drop_warm()
        plan = self.sampler.plan_of(epoch)
        if not plan.batch_sizes:
            return
        first = self.sampler.rows[plan.pieces[0].positions()]
        if self._indptr is not None:
            nnz = int(self.row_nnz(first).sum())
        else:
            per_row = current.per_row() or self.nnz_per_row
            if per_row is None:
                return
            nnz = math.ceil(per_row * first.size)
        need = piece_bytes(nnz, first.size, self.entry_dtypes)
        if current.budget.used + need > self.memory_budget_bytes:
            return
        self.max_inflight_bytes = max(self.max_inflight_bytes, current.budget.used + need)
        pipe = Pipeline(weakref.proxy(self), self.sampler.rows, plan.pieces, plan.batch_sizes, hold=True)
        # the pass holds the loader weakly: dropping the loader without close() still stops the pass
        self._warm = (epoch, pipe, weakref.finalize(self, pipe.close, False))

    def _claim_warm(self) -> Pipeline | None:
        """The pass started ahead, when it is exactly the one about to run; otherwise it is stopped."""
        warm = self._warm
        if warm is None:
            return None
        epoch, pipe, finalizer = warm
        if epoch == self.sampler.epoch and self.sampler.at_epoch_start:
            self._warm = None
            finalizer.detach()
            return pipe
        self._drop_warm()
        return None

    # -- sizes and assembly: the Pipeline's Owner protocol, called from its assembler thread ---------------------------
    def row_nnz(self, rows: np.ndarray) -> np.ndarray | None:
        if self._indptr is None:
            return None
        return self._indptr[rows + 1] - self._indptr[rows]

    def batch_bytes(self, n: int, nnz: int) -> int:
        if self.device.type == "cuda":
            return 12 * nnz + 8 * n  # pinned values, int32 rows and cols; codes
        return 4 * n * self.n_vars + 20 * nnz + 8 * n  # dense x_ng, nonzero (2 x int64) + the CSR slice; codes

    def assemble(self, rows_n: np.ndarray, parts: list[sp.csr_matrix], nbytes: int) -> _HostBatch:
        x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        codes = torch.from_numpy(self.batch_codes[rows_n].astype(np.int64))
        nz_rows = np.repeat(np.arange(x.shape[0], dtype=np.int64), np.diff(x.indptr))
        if self.device.type == "cuda":
            coo = (
                torch.from_numpy(x.data),
                torch.from_numpy(nz_rows.astype(np.int32)),
                torch.from_numpy(x.indices.astype(np.int32, copy=False)),
            )
            if self.pin_memory:
                coo = tuple(t.pin_memory() for t in coo)
                codes = codes.pin_memory()
            return _HostBatch(None, coo, codes, rows_n, self.n_vars, nbytes)
        nonzero = (torch.from_numpy(nz_rows), torch.from_numpy(x.indices.astype(np.int64)))
        return _HostBatch(Batch(torch.from_numpy(x.toarray()), codes, rows_n, nonzero), None, codes, rows_n, 0, nbytes)


@dataclass
class _HostBatch:
    """One assembled minibatch on the host: a dense ``Batch`` (CPU) or COO parts to densify on the device (CUDA)."""

    batch: Batch | None
    coo: tuple[torch.Tensor, ...] | None  # values float32, rows int32, cols int32
    codes: torch.Tensor
    rows_n: np.ndarray
    n_vars: int
    nbytes: int


class _DeviceStager:
    """Non-blocking copies of pinned COO parts on a side stream, densified on the device (CUDA only; not run by
    the CPU test suite).

    The side stream lets the copy of minibatch ``k + 1`` overlap the compute stream's work on ``k``; the compute
    stream waits on an event before it uses the tensors, which are marked as used by it so the caching
    allocator does not hand their memory out early.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def stage(self, hb: _HostBatch) -> Batch:
        with torch.cuda.stream(self.stream):
            batch = densify(hb, self.device)
            done = torch.cuda.Event()
            done.record(self.stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        assert batch.nonzero is not None
        for t in (batch.x_ng, batch.batch_n, *batch.nonzero):
            t.record_stream(current)
        return batch


def densify(hb: _HostBatch, device: torch.device | str) -> Batch:
    """A COO host batch copied to ``device`` (non-blocking from pinned memory) and made dense there."""
    assert hb.coo is not None
    values, rows, cols = hb.coo
    v = values.to(device, non_blocking=True)
    r = rows.to(device, non_blocking=True).long()
    c = cols.to(device, non_blocking=True).long()
    codes = hb.codes.to(device, non_blocking=True)
    x_ng = torch.zeros((hb.rows_n.size, hb.n_vars), dtype=torch.float32, device=device)
    x_ng.index_put_((r, c), v)
    return Batch(x_ng, codes, hb.rows_n, (r, c))
