"""The threads behind :class:`~scvi_scale.data.prefetch.StoreLoader`: reader pool, assembler, byte budget.

One :class:`Pipeline` serves one pass over a sampler plan. Reader threads read pieces (a buffer's cells) as
row ranges through ``store.read_range``, one task per thread and piece, into a
:class:`~scvi_scale.data.piece.CompactPiece`; one assembler thread waits for the pieces in plan order, cuts
minibatches in plan order and puts them in a bounded queue the consumer takes from. Bytes in flight (pieces
being read or held, minibatches queued) are reserved in a :class:`Budget` before the work that allocates them
(see :mod:`scvi_scale.data.prefetch` for the rule).

Read-ahead is one piece: while the assembler cuts minibatches from piece ``k``, the readers read piece
``k + 1`` and nothing further (more only while the pieces read ahead hold fewer than
``READ_AHEAD_BATCHES`` minibatches, e.g. the small pieces of an unshuffled pass). Reading a piece takes a
fraction of the time training consumes it, so a deeper read-ahead only holds memory: with it, the loader's
memory no longer depends on how many pieces an epoch has (a 2M-cell store holds what a 100k-cell one does).
"""

from __future__ import annotations

import ctypes
import functools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from scvi_scale.data.memory import _canonical_csr
from scvi_scale.data.piece import CompactPiece, EntryDtypes, piece_bytes
from scvi_scale.data.sampler import Piece
from scvi_scale.store.errors import InputError

MAX_GAP_ROWS = 32  # rows of the other split within this distance are read and dropped rather than skipped
QUEUE_BATCHES = 4  # assembled minibatches waiting for the consumer (also bounded by the memory budget)
READ_AHEAD_BATCHES = 8  # read a further piece ahead only while those ahead hold fewer minibatches than this
_POLL_S = 0.05  # how often blocked threads look at the stop flag


def release_free_memory(min_interval_s: float = 0.0) -> None:
    """Hand memory freed inside the C allocator back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Called when a piece is let go and after each pass. Reader threads decode blocks of ~1 MB, below glibc's mmap
    threshold once it has adapted, so freed blocks stay in the threads' malloc arenas; each pass starts new
    threads, and glibc gives new threads new arenas. Without trims the resident set of training from a store grew
    ~60-80 MB an epoch on the 100k-cell benchmark store (1.02 GB after one epoch, 1.22 GB after three; 1.08 GB
    with a trim after each pass) and ~80 MB along one epoch of the 2M-cell store. A trim takes well under a
    millisecond when there is little to hand back, ~1 ms in a loader at work: ``min_interval_s`` skips trims
    closer together than that (the small pieces of an unshuffled pass are let go many times a second).
    """
    trim = _malloc_trim()
    now = time.monotonic()
    if trim is not None and now - _last_trim[0] >= min_interval_s:
        _last_trim[0] = now
        trim(0)


_last_trim = [float("-inf")]  # when the last trim ran (any thread: a skipped or doubled trim is harmless)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


class RangeReader(Protocol):
    """What the loader needs from a count store (``MemoryStore``, ``ZarrStore``, ``TileDBStore``, S3 stores)."""

    n_obs: int
    n_vars: int

    def read_range(self, start: int, stop: int) -> sp.csr_matrix: ...


class Owner(Protocol):
    """What a pipeline needs from its loader: where to read, its limits, and how to size and build minibatches."""

    store: RangeReader
    source: str
    n_vars: int
    block_size: int
    entry_dtypes: EntryDtypes  # how pieces keep their entries
    num_threads: int
    memory_budget_bytes: int
    batch_size: int
    nnz_per_row: float | None  # the store's mean, when known without reading
    times: dict[str, float]

    def row_nnz(self, rows: np.ndarray) -> np.ndarray | None: ...  # exact entries per row, when known
    def batch_bytes(self, n: int, nnz: int) -> int: ...
    def assemble(self, rows_n: np.ndarray, parts: list[sp.csr_matrix], nbytes: int) -> Any: ...


class StoreReadError(RuntimeError):
    """A reader thread failed; the message names the store and the rows."""


@dataclass
class _Part:
    """What one read task returns: its blocks of consecutive sorted rows (none when written into the piece),
    and its seconds."""

    blocks: list[CompactPiece]
    read_s: float
    decode_s: float
    complete: bool  # False when it stopped early (the pipeline is closing): the piece is not whole


def _read_spans(
    store: RangeReader,
    source: str,
    srt: np.ndarray,
    spans: list[tuple[int, int]],
    stop: threading.Event,
    piece: CompactPiece | None,
    dtypes: EntryDtypes,
) -> _Part:
    """Rows ``srt[i:j]`` for each span: one ``read_range`` over the span's row numbers, then the rows asked for,
    written into ``piece`` at rows ``i:j`` (or, without one, returned in ``dtypes``). Returns early (with a
    partial result nobody reads) once ``stop`` is set."""
    blocks, read_s, decode_s = [], 0.0, 0.0
    for i, j in spans:
        if stop.is_set():
            return _Part(blocks, read_s, decode_s, False)
        lo, hi = int(srt[i]), int(srt[j - 1]) + 1
        t0 = time.perf_counter()
        try:
            m = store.read_range(lo, hi)
        except InputError:
            raise  # already one line naming the store and what to do (e.g. a damaged chunk)
        except Exception as exc:
            raise StoreReadError(f"{source}: reading rows [{lo}, {hi}) failed ({type(exc).__name__}: {exc})") from exc
        t1 = time.perf_counter()
        if j - i != hi - lo:  # the range spans rows of the other split: keep ours
            m = m[srt[i:j] - lo]
        try:
            if piece is None:
                blocks.append(CompactPiece.convert(m, dtypes))
            else:
                piece.fill(i, m)
        except ValueError as exc:  # counts beyond the declared dtype, or rows that changed since the row pointers
            raise StoreReadError(f"{source}: rows [{lo}, {hi}): {exc}") from exc
        read_s += t1 - t0
        decode_s += time.perf_counter() - t1
    return _Part(blocks, read_s, decode_s, True)


def _split_spans(srt: np.ndarray, n_tasks: int, max_rows: int) -> list[list[tuple[int, int]]]:
    """Row ranges of a piece (merged across gaps of up to ``MAX_GAP_ROWS``, cut to at most ``max_rows`` rows so
    a ``read_range`` block, float32 before it is narrowed into the piece, stays small), dealt into ``n_tasks``
    contiguous groups of about equal rows, so the threads share one piece and the first minibatch comes sooner."""
    cut = np.flatnonzero(np.diff(srt) > MAX_GAP_ROWS + 1) + 1
    spans = []
    for a, b in zip(np.r_[0, cut].tolist(), np.r_[cut, srt.size].tolist(), strict=True):
        spans += [(i, min(i + max_rows, b)) for i in range(a, b, max(max_rows, 1))]
    n_tasks = max(1, min(n_tasks, len(spans)))
    ends = np.array([j for _, j in spans])
    bounds = np.searchsorted(ends, np.linspace(0, srt.size, n_tasks + 1)[1:-1], side="left") + 1
    groups = np.split(np.arange(len(spans)), np.unique(np.clip(bounds, 1, len(spans))))
    return [[spans[k] for k in g] for g in groups if g.size]


@dataclass
class _Pending:
    """A piece being read: its rows (visiting order and sorted), read tasks, the bytes reserved for it, and the
    piece the tasks write into (None: they return blocks, joined when all are done)."""

    rows: np.ndarray
    sorted_rows: np.ndarray
    tasks: list[Future]
    reserved: int
    piece: CompactPiece | None


@dataclass
class _Loaded:
    """A piece in memory: its rows in visiting order and its counts, rows in sorted order."""

    rows: np.ndarray
    sorted_rows: np.ndarray
    x: CompactPiece
    nbytes: int


class Budget:
    """Bytes in flight, with blocking reservations and a recorded peak."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def try_acquire(self, n: int, headroom: int = 0) -> bool:
        with self._cond:
            if self.used + n + headroom > self.limit:
                return False
            self._take(n)
            return True

    def acquire(self, n: int, stop: threading.Event, force: Callable[[], bool]) -> bool:
        """Wait until ``n`` bytes fit, or ``force()`` says waiting cannot free any; False when stopped."""
        with self._cond:
            while self.used + n > self.limit and not force():
                if stop.is_set():
                    return False
                self._cond.wait(_POLL_S)
            self._take(n)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self._take(-n)
            self._cond.notify_all()

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)


class Pipeline:
    """Reader pool, one assembler thread and a bounded queue to the consumer, for one pass over a plan.

    With ``hold``, the pipeline reads its first piece and then waits for :meth:`release` (or the first
    :meth:`get`) before it reads further or cuts minibatches: a pass started ahead of time (the next epoch,
    while the current one ends) holds one piece, not a read-ahead's worth.
    """

    def __init__(
        self, loader: Owner, rows: np.ndarray, pieces: list[Piece], batch_sizes: list[int], *, hold: bool = False
    ) -> None:
        self.loader = loader
        self.rows = rows
        self.pieces = pieces
        self.batch_sizes = batch_sizes
        self.budget = Budget(loader.memory_budget_bytes)
        self.out: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.stop = threading.Event()
        self.go = threading.Event()
        self.seen = [0, 0]
        if not hold:
            self.go.set()
        self.pool = ThreadPoolExecutor(loader.num_threads, thread_name_prefix="scvi-scale-read")
        self.thread = threading.Thread(target=self._run, name="scvi-scale-assemble", daemon=True)
        self.thread.start()

    # consumer side
    def release(self) -> None:
        """Let a held pipeline run on (see the class docstring)."""
        self.go.set()

    def get(self) -> Any:
        self.go.set()
        while True:
            try:
                kind, item = self.out.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.out.empty():
                    raise RuntimeError("the loader's assembler thread ended early") from None
                continue
            if kind == "error":
                raise item
            self.budget.release(item.nbytes)
            return item

    def close(self, wait: bool = True) -> None:
        """Stop the threads; without ``wait`` (a finalizer, which may run on any thread) they end by themselves
        within a poll interval, or after their current ``read_range``."""
        self.stop.set()
        self.pool.shutdown(wait=wait, cancel_futures=True)
        if wait and threading.current_thread() is not self.thread:
            self.thread.join()

    def per_row(self) -> float | None:
        """Stored counts per row read so far by this pass (None before its first piece)."""
        return self.seen[0] / self.seen[1] if self.seen[1] else None

    # assembler thread
    def _put(self, item: tuple[str, Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self._assemble_all()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(("error", exc))

    def _assemble_all(self) -> None:
        loader, times, rows = self.loader, self.loader.times, self.rows
        dtypes = loader.entry_dtypes
        pending: deque[_Pending] = deque()  # pieces submitted, in plan order
        loaded: deque[tuple[int, _Loaded]] = deque()  # (stream offset of the piece, piece)
        seen = self.seen  # counts and rows read so far (estimates for stores without row pointers)
        next_piece = 0  # the next piece to submit
        covered = 0  # stream offset up to which pieces are loaded
        pos = 0  # stream offset of the next minibatch
        # kept free when reading ahead, for one minibatch: the biggest so far, at first one of average density
        headroom = loader.batch_bytes(loader.batch_size, math.ceil((loader.nnz_per_row or 0.0) * loader.batch_size))

        def held() -> int:  # bytes only this thread frees: waiting for the consumer cannot free them
            return sum(p.nbytes for _, p in loaded) + sum(p.reserved for p in pending)

        def reserve(piece_rows: np.ndarray, srt: np.ndarray) -> tuple[int | None, CompactPiece | None]:
            """Bytes to reserve for a piece and, when the store's row lengths are known, its empty arrays."""
            row_nnz = loader.row_nnz(srt)
            if row_nnz is not None:
                piece = CompactPiece.allocate(row_nnz, loader.n_vars, dtypes)
                return piece.nbytes(), piece
            per_row = seen[0] / seen[1] if seen[1] else loader.nnz_per_row
            if per_row is None:
                return None, None
            return piece_bytes(math.ceil(per_row * piece_rows.size), piece_rows.size, dtypes), None

        def submit(piece_rows: np.ndarray, srt: np.ndarray, reserved: int, piece: CompactPiece | None) -> None:
            nonlocal next_piece
            tasks = [
                self.pool.submit(_read_spans, loader.store, loader.source, srt, spans, self.stop, piece, dtypes)
                for spans in _split_spans(srt, loader.num_threads, 2 * loader.block_size)
            ]
            pending.append(_Pending(piece_rows, srt, tasks, reserved, piece))
            next_piece += 1

        def read_ahead() -> None:
            room = max(
                headroom,
                loader.batch_bytes(loader.batch_size, math.ceil(seen[0] / max(seen[1], 1) * loader.batch_size)),
            )
            ahead_limit = READ_AHEAD_BATCHES * loader.batch_size
            while next_piece < len(self.pieces) and len(pending) <= loader.num_threads:
                if pending and sum(p.rows.size for p in pending) >= ahead_limit:
                    return  # a piece (or enough small ones) is being read ahead: that covers the reading time
                if prepared.get("index") != next_piece:  # kept while the budget is full: tried again next time
                    piece_rows = rows[self.pieces[next_piece].positions()]
                    srt = np.sort(piece_rows)
                    prepared.update(index=next_piece, rows=piece_rows, srt=srt, reserve=reserve(piece_rows, srt))
                est, piece = prepared["reserve"]
                if est is None or not self.budget.try_acquire(est, room):
                    return
                submit(prepared["rows"], prepared["srt"], est, piece)
                prepared.clear()

        prepared: dict[str, Any] = {}  # the next piece's rows and reservation, made once

        def force() -> bool:
            return self.budget.used <= held()

        for size in self.batch_sizes:
            end = pos + size
            while covered < end:  # load pieces until this minibatch is covered
                if not pending:  # nothing read ahead: the next piece is needed now; wait for room
                    piece_rows = rows[self.pieces[next_piece].positions()]
                    srt = np.sort(piece_rows)
                    est, piece = reserve(piece_rows, srt)
                    prepared.clear()
                    if not self.budget.acquire(est or 0, self.stop, force):
                        return
                    submit(piece_rows, srt, est or 0, piece)
                while not self.go.wait(_POLL_S):  # held: the first piece is being read; nothing more yet
                    if self.stop.is_set():
                        return
                read_ahead()
                head = pending[0]
                while not all(t.done() for t in head.tasks):
                    if self.stop.is_set():
                        return
                    wait_futures(head.tasks, timeout=_POLL_S)
                results = [t.result() for t in head.tasks]
                if self.stop.is_set() or not all(r.complete for r in results):
                    return  # closing: tasks stopped early, so the piece has unwritten rows
                pending.popleft()
                t0 = time.perf_counter()
                x = head.piece
                if x is None:
                    x = CompactPiece.join([b for r in results for b in r.blocks], loader.n_vars, dtypes)
                piece = _Loaded(head.rows, head.sorted_rows, x, x.nbytes())
                self.budget.release(head.reserved - piece.nbytes)  # exact when the store has row pointers
                times["read_s"] += sum(r.read_s for r in results)
                times["decode_s"] += sum(r.decode_s for r in results) + time.perf_counter() - t0
                seen[0], seen[1] = seen[0] + x.nnz, seen[1] + head.rows.size
                del results  # the blocks a join copied
                loaded.append((covered, piece))
                covered += head.rows.size
            t0 = time.perf_counter()
            parts, rows_n = [], []
            for start, piece in loaded:
                a, b = max(pos - start, 0), min(end - start, piece.rows.size)
                if a < b:
                    parts.append(_canonical_csr(piece.x.take(np.searchsorted(piece.sorted_rows, piece.rows[a:b]))))
                    rows_n.append(piece.rows[a:b])
            nbytes = loader.batch_bytes(size, sum(p.nnz for p in parts))
            headroom = max(headroom, nbytes)
            t1 = time.perf_counter()
            if not self.budget.acquire(nbytes, self.stop, force):
                return
            t2 = time.perf_counter()
            hb = loader.assemble(rows_n[0] if len(rows_n) == 1 else np.concatenate(rows_n), parts, nbytes)
            times["assemble_s"] += time.perf_counter() - t2 + (t1 - t0)
            pos = end
            while loaded and loaded[0][0] + loaded[0][1].rows.size <= pos:  # pieces fully handed out
                self.budget.release(loaded.popleft()[1].nbytes)
                release_free_memory(min_interval_s=1.0)
            read_ahead()
            if not self._put(("batch", hb)):
                return
