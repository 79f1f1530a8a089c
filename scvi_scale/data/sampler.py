"""Block sampling for out-of-core loaders: which cells each rank reads, in which order, every epoch.

Reading scattered rows from a chunked store decodes a whole chunk per row, so cells are sampled in *blocks*:
runs of ``block_size`` consecutive served rows (mostly contiguous on disk). One epoch, drawn from
``SeedSequence([seed, epoch])`` alone:

1. the block grid is shifted by a random offset in ``[0, block_size)`` (so cells that shared a block last
   epoch need not share one now: a fixed grid would keep them together forever), and the blocks are permuted;
2. the concatenated block sequence is cut into ``world_size`` contiguous *shares* of equal size (+-1 cell):
   rank ``r`` reads only its share, whole blocks apart from the two ends, and the shares move every epoch;
3. each rank cuts its share into *buffers* of ``buffer_blocks * block_size`` cells (blocks from all over the
   store), permutes the cells of each buffer and cuts the result into minibatches. A loader reads a buffer
   (or, after a resume, part of one: a :class:`Piece`) at once.

Equal steps and every cell exactly once. Every rank takes ``S`` steps: ``S - 1`` minibatches of
``batch_size`` and a last one holding the rest of its share (shares differ by at most one cell). When some
rank's last minibatch would hold fewer than ``min_last`` cells (1 or 2 cells break BatchNorm in training), it
is merged into the one before (which then holds up to ``batch_size + min_last`` cells). So every served cell
is in exactly one minibatch of one rank per epoch and no cell is padded or repeated; ``drop_last=True``
instead drops every rank's cells past ``S * batch_size`` with ``S = min_r(n_r) // batch_size``.

Resume. :meth:`BlockSampler.state_dict` records the epoch and how many steps were taken at which world size
(``step`` counts from the start of the epoch, as the training loop does).
Loading it at the same world size skips exactly those steps. Loading it at another world size takes the cells
the old ranks had not consumed yet (their streams past the steps taken, rank by rank, in their already shuffled
order), and cuts that remainder into equal contiguous shares for the new ranks, with the same step rule. The
old consumed cells plus the new remaining ones are every cell once. This nests: a state taken after a
re-partition lists each world size and its steps (``segments``).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

STATE_VERSION = 1
MIN_LAST = 3  # BatchNorm in training needs more than one cell; scvi-tools also avoids 2-cell last batches


# what a resumed sampler must share with the one that wrote the state
_IDENTITY = (
    "seed",
    "n_obs",
    "rows_digest",
    "batch_size",
    "block_size",
    "buffer_blocks",
    "shuffle",
    "drop_last",
    "min_last",
)


class _Layout:
    """One epoch's blocks: boundaries (shifted by a random offset) and visiting order, over positions in ``rows``."""

    def __init__(self, n: int, block_size: int, seed: int, epoch: int, shuffle: bool) -> None:
        if shuffle and n > 0:
            rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
            offset = int(rng.integers(block_size)) if n > block_size else 0
            inner = np.arange(offset if offset else block_size, n, block_size, dtype=np.int64)
            bounds = np.concatenate([[0], inner, [n]]).astype(np.int64)
            order = rng.permutation(bounds.size - 1)
        else:  # validation / inference: rows in store order, one block
            offset = 0
            bounds = np.array([0, n], dtype=np.int64)
            order = np.arange(1 if n else 0)
        self.offset = offset
        self.bounds = bounds
        self.starts = bounds[:-1][order]
        self.sizes = np.diff(bounds)[order]
        self.cum = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def positions(self, a: int, b: int) -> np.ndarray:
        """Positions (into ``rows``) of cells ``[a, b)`` of the block sequence."""
        if b <= a:
            return np.empty(0, dtype=np.int64)
        i0 = int(np.searchsorted(self.cum, a, side="right")) - 1
        i1 = int(np.searchsorted(self.cum, b, side="left"))
        lo = np.maximum(self.cum[i0:i1], a) - self.cum[i0:i1] + self.starts[i0:i1]
        hi = np.minimum(self.cum[i0 + 1 : i1 + 1], b) - self.cum[i0:i1] + self.starts[i0:i1]
        lengths = hi - lo
        # concatenated aranges lo[k]:hi[k] without a Python loop over blocks
        base = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return base + np.arange(int(lengths.sum()), dtype=np.int64)


@dataclass(frozen=True)
class _Buffer:
    """Cells ``[a, b)`` of an epoch's block sequence, in an order permuted from (seed, epoch, a)."""

    layout: _Layout
    a: int
    b: int
    seed: int
    epoch: int
    shuffle: bool

    def positions(self) -> np.ndarray:
        pos = self.layout.positions(self.a, self.b)
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 1, self.a]))
            pos = pos[rng.permutation(pos.size)]
        return pos


@dataclass(frozen=True)
class Piece:
    """Cells ``[lo, hi)`` of a buffer's visiting order: the unit a loader reads at once."""

    buffer: _Buffer
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def positions(self) -> np.ndarray:
        return self.buffer.positions()[self.lo : self.hi]


def _slice(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """Cells ``[start, stop)`` of the concatenation of ``pieces``, as pieces."""
    out, offset = [], 0
    for p in pieces:
        a, b = max(start - offset, 0), min(stop - offset, p.size)
        if a < b:
            out.append(Piece(p.buffer, p.lo + a, p.lo + b))
        offset += p.size
        if offset >= stop:
            break
    return out


def _cuts(n: int, world_size: int) -> list[int]:
    """Boundaries of ``world_size`` contiguous shares of ``n`` cells whose sizes differ by at most one."""
    return [(r * n) // world_size for r in range(world_size + 1)]


def step_sizes(
    n_r: Sequence[int], batch_size: int, drop_last: bool = False, min_last: int = MIN_LAST
) -> list[list[int]]:
    """Minibatch sizes of every rank, given the cells ``n_r`` each rank holds; every rank gets as many steps.

    See the module docstring for the rule. Raises ``ValueError`` when some rank would get no cells at all.
    """
    n_min, n_max = min(n_r), max(n_r)
    if drop_last:
        steps = n_min // batch_size
        return [[batch_size] * steps for _ in n_r]
    if n_max == 0:
        return [[] for _ in n_r]
    if n_min == 0:
        raise ValueError(f"{sum(n_r)} cells cannot give each of {len(n_r)} ranks a minibatch")
    steps = math.ceil(n_max / batch_size)
    if steps >= 2 and n_min - (steps - 1) * batch_size < min_last:
        steps -= 1  # fold the tiny last minibatch into the one before it, on every rank alike
    return [[batch_size] * (steps - 1) + [n - (steps - 1) * batch_size] for n in n_r]


@dataclass(frozen=True)
class EpochPlan:
    """What one rank has left of an epoch: pieces to read in order, and the minibatch sizes cut from them."""

    pieces: list[Piece]
    batch_sizes: list[int]

    @property
    def n_obs(self) -> int:
        return sum(self.batch_sizes)


class BlockSampler:
    """Per-epoch block-shuffled minibatches of row indices for one rank (see the module docstring).

    Parameters
    ----------
    rows
        The rows this sampler serves (e.g. the training split), strictly increasing store row numbers.
    block_size
        Consecutive served rows read together.
    buffer_blocks
        Blocks whose cells are shuffled together; minibatch diversity grows with it (label entropy falls short
        of i.i.d. by about ``(K - 1) / (2 * buffer_blocks)`` nats for K labels stored sorted).
    batch_size
        Cells per minibatch (the last one of an epoch may differ, see the module docstring).
    seed
        Root seed; epoch ``e`` draws from ``SeedSequence([seed, e])``.
    rank, world_size
        This rank and the number of ranks (arguments, never read from the environment).
    shuffle
        False: rows in order, split contiguously among ranks (validation, inference).
    drop_last
        Drop cells beyond the last full minibatch of the smallest rank (then cells are not all seen).
    min_last
        The smallest last minibatch kept on its own.
    """

    def __init__(
        self,
        rows: np.ndarray,
        block_size: int,
        buffer_blocks: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        min_last: int = MIN_LAST,
    ) -> None:
        self.rows = np.asarray(rows)  # int32 or int64, as given: kept for every served cell
        if self.rows.dtype.kind not in "iu":
            raise ValueError(f"rows must be integers, got {self.rows.dtype}")
        if self.rows.ndim != 1 or (self.rows.size > 1 and (np.diff(self.rows) <= 0).any()):
            raise ValueError("rows must be a strictly increasing 1-D array of row numbers")
        for name, value in (("block_size", block_size), ("buffer_blocks", buffer_blocks), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.block_size, self.buffer_blocks, self.batch_size = int(block_size), int(buffer_blocks), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.min_last = bool(shuffle), bool(drop_last), int(min_last)
        self.epoch = 0
        self._past: list[tuple[int, int]] = []  # (world_size, steps) of earlier segments of this epoch
        self._skip = 0  # steps of the current segment already taken (resume)
        self._layout: tuple[int, _Layout] | None = None

    @property
    def n_obs(self) -> int:
        return int(self.rows.size)

    @cached_property
    def rows_digest(self) -> str:
        """A short hash of ``rows``: a resumed run must serve the same split."""
        h = hashlib.blake2b(digest_size=8)
        for a in range(0, self.rows.size, 1 << 20):  # hashed as int64 whatever the dtype, piece by piece
            h.update(self.rows[a : a + (1 << 20)].astype(np.int64).tobytes())
        return h.hexdigest()

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._past, self._skip = [], 0
        self.epoch = int(epoch)

    # -- plans ------------------------------------------------------------------------------------------------------
    def layout(self, epoch: int) -> _Layout:
        """Block boundaries and order of ``epoch`` (exposed for tests: they move every epoch)."""
        if self._layout is None or self._layout[0] != epoch:
            self._layout = (epoch, _Layout(self.n_obs, self.block_size, self.seed, epoch, self.shuffle))
        return self._layout[1]

    def _streams(self, layout: _Layout, world_size: int) -> list[list[Piece]]:
        """Every rank's pieces in the first segment of an epoch: its share of the block sequence, in buffers."""
        unit = self.block_size * self.buffer_blocks
        cuts = _cuts(self.n_obs, world_size)
        streams = []
        for r in range(world_size):
            a, b = cuts[r], cuts[r + 1]
            ep, shuffle = self.epoch, self.shuffle
            bufs = [_Buffer(layout, s, min(s + unit, b), self.seed, ep, shuffle) for s in range(a, b, unit)]
            streams.append([Piece(buf, 0, buf.b - buf.a) for buf in bufs])
        return streams

    def _segment_streams(self) -> tuple[list[list[Piece]], list[list[int]]]:
        """All ranks' pieces and minibatch sizes of the current segment (after any re-partitions)."""
        layout = self.layout(self.epoch)
        chain = [w for w, _ in self._past] + [self.world_size]
        streams = self._streams(layout, chain[0])
        sizes = step_sizes([sum(p.size for p in s) for s in streams], self.batch_size, self.drop_last, self.min_last)
        for (w_old, steps), w_new in zip(self._past, chain[1:], strict=True):
            if steps > len(sizes[0]):
                raise ValueError(f"the state says {steps} steps were taken at world size {w_old}, the epoch has fewer")
            # the cells the old ranks had not consumed, rank by rank, in their visiting order
            rest: list[Piece] = []
            for s, sz in zip(streams, sizes, strict=True):
                rest += _slice(s, sum(sz[:steps]), sum(sz))
            m = sum(p.size for p in rest)
            cuts = _cuts(m, w_new)
            streams = [_slice(rest, cuts[r], cuts[r + 1]) for r in range(w_new)]
            sizes = step_sizes([cuts[r + 1] - cuts[r] for r in range(w_new)], self.batch_size, False, self.min_last)
        return streams, sizes

    def plan(self) -> EpochPlan:
        """What this rank has left of the current epoch (all of it unless resumed mid-epoch)."""
        streams, sizes = self._segment_streams()
        mine, sz = streams[self.rank], sizes[self.rank]
        if self._skip > len(sz):
            raise ValueError(f"cannot skip {self._skip} steps: the epoch has {len(sz)}")
        done = sum(sz[: self._skip])
        return EpochPlan(_slice(mine, done, sum(sz)), sz[self._skip :])

    @property
    def at_epoch_start(self) -> bool:
        """True unless resumed mid-epoch (a pass now would serve the whole epoch)."""
        return not self._past and self._skip == 0

    def plan_of(self, epoch: int) -> EpochPlan:
        """The whole plan of ``epoch`` from its start, leaving this sampler as it is (for reading ahead)."""
        other = copy.copy(self)
        other._past, other._skip, other.epoch = [], 0, int(epoch)
        return other.plan()

    def start_pass(self) -> EpochPlan:
        """:meth:`plan`, and forget the resume position: a loader calls this when an iteration starts."""
        plan = self.plan()
        self._skip = 0
        return plan

    def __len__(self) -> int:
        """Steps of the current epoch on this rank (every rank has as many), including ones already taken."""
        _, sizes = self._segment_streams()
        return sum(s for _, s in self._past) + len(sizes[self.rank])

    def __iter__(self) -> Iterator[np.ndarray]:
        """The remaining minibatches of the current epoch as arrays of store rows (for tests and simple loaders)."""
        plan = self.plan()
        stream = np.concatenate([self.rows[p.positions()] for p in plan.pieces]) if plan.pieces else np.empty(0, int)
        offsets = np.concatenate([[0], np.cumsum(plan.batch_sizes)]).astype(int)
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            yield stream[a:b]

    # -- resume -----------------------------------------------------------------------------------------------------
    def state_dict(self, steps_done: int) -> dict:
        """State after ``steps_done`` steps of the current epoch (counted from its start, across re-partitions)."""
        past_steps = sum(s for _, s in self._past)
        if steps_done < past_steps:
            raise ValueError(f"steps_done {steps_done} is before the resume point {past_steps}")
        return {
            "version": STATE_VERSION,
            "kind": "block",
            "epoch": self.epoch,
            "step": int(steps_done),
            "segments": [[w, s] for w, s in self._past] + [[self.world_size, int(steps_done) - past_steps]],
            "seed": self.seed,
            "n_obs": self.n_obs,
            "rows_digest": self.rows_digest,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "buffer_blocks": self.buffer_blocks,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "min_last": self.min_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the same world size skips the steps taken; another one re-partitions what is left."""
        if state.get("version") != STATE_VERSION or state.get("kind") != "block":
            raise ValueError(f"loader state {state.get('kind')} v{state.get('version')} does not fit BlockSampler")
        keys = _IDENTITY
        wrong = [f"{k} {state.get(k)!r} vs {getattr(self, k)!r}" for k in keys if state.get(k) != getattr(self, k)]
        if wrong:
            raise ValueError(
                "cannot resume: the checkpoint was taken with a different split, batch size, blocks or seed ("
                + ", ".join(wrong)
                + ")"
            )
        segments = [(int(w), int(s)) for w, s in state["segments"]]
        if sum(s for _, s in segments) != int(state["step"]):
            raise ValueError(f"inconsistent loader state: segments {segments} do not add up to step {state['step']}")
        if state.get("drop_last") and segments[-1][0] != self.world_size:
            raise ValueError("cannot re-partition an epoch sampled with drop_last=True at another world size")
        self.epoch = int(state["epoch"])
        if segments[-1][0] == self.world_size:
            self._past, self._skip = segments[:-1], segments[-1][1]
        else:
            self._past, self._skip = segments, 0
        self.plan()  # fail now, not mid-epoch, if the state does not fit
