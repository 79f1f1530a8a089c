"""The sharded, idempotent writer: per-cell outputs written back into the count store, region by region.

The rows are cut into regions of ``region_rows`` rows, whole chunks of the ``obsm`` arrays (so no two writers
ever touch the same chunk or object). A region is written as:

1. if its commit mark holds another embedding's token, clear the mark (its data is about to change);
2. compute its outputs, minibatch by minibatch from the region's first row (the same batches whichever
   worker runs it), and write them into ``obsm/X_scvi`` (and ``X_scvi_var``, ``X_scvi_library``);
3. set its commit mark to this embedding's token (one object or fragment, written atomically).

The marks live in the store (``uns/scvi_scale_embed_commits``: one uint64 per region, each its own Zarr chunk
object or TileDB fragment). A rerun skips the regions whose mark holds its token: a killed job resumes where it
stopped and ends with the same bytes as a job never interrupted. The token hashes what decides the bytes (model
weights, outputs, batch size, regions, rows, genes, device), so a run with another model rewrites every region;
step 1 is what keeps it safe to go back: a region half-rewritten by a killed run of model B must not keep the
mark of model A. The manifest (store metadata ``"embed"``) is set incomplete before anything else changes, and
complete, with the model hash, config, row count and outputs, only once every mark holds the token.

One coordinator calls :func:`begin`, fans the pending regions out (in this process, to spawned processes or to
Ray tasks: :func:`region_task`) and calls :func:`finish`. Arrays and marks are (re)made in :func:`begin` only,
never by workers; two coordinators must not start on one store at once (both might remake them).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch

from scvi_scale.data.batch import Batch
from scvi_scale.infer.embed import latent_representation
from scvi_scale.model.vae import VAE
from scvi_scale.store.errors import InputError
from scvi_scale.store.zarr_store import OBSM_CHUNK_ROWS, utc_now

__all__ = [
    "MANIFEST",
    "MARKS",
    "OUTPUT_KEYS",
    "Begun",
    "EmbedJob",
    "EmbedSummary",
    "RegionPlan",
    "begin",
    "finish",
    "model_hash",
    "plan_regions",
    "region_outputs",
    "region_task",
    "run_processes",
    "write_region",
]

log = logging.getLogger(__name__)

WRITER_VERSION = 1
OUTPUT_KEYS = {"latent": "X_scvi", "latent_var": "X_scvi_var", "library": "X_scvi_library"}
MANIFEST = "embed"  # store metadata entry
MARKS = "scvi_scale_embed_commits"  # uns/<MARKS>: one uint64 token per region, 0 = not committed


class RegionStore(Protocol):
    """What the writer needs of a store (``ZarrStore``, ``TileDBStore``) besides :class:`CountStore`."""

    source: str
    n_obs: int
    metadata: dict[str, Any]

    def write_obsm(self, key: str, start: int, stop: int, values: np.ndarray) -> None: ...
    def obsm_layout(self, key: str) -> tuple[int, int, int] | None: ...
    def create_obsm(self, key: str, n_cols: int, chunk_rows: int) -> None: ...
    def delete_obsm(self, key: str) -> None: ...
    def read_marks(self, name: str) -> np.ndarray | None: ...
    def create_marks(self, name: str, size: int) -> None: ...
    def write_mark(self, name: str, index: int, value: int) -> None: ...
    def update_metadata(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True)
class RegionPlan:
    """Rows ``[i * region_rows, (i + 1) * region_rows)`` form region ``i``; regions start on chunk boundaries."""

    n_obs: int
    region_rows: int
    chunk_rows: int

    @property
    def n_regions(self) -> int:
        return math.ceil(self.n_obs / self.region_rows)

    def bounds(self, region: int) -> tuple[int, int]:
        start = region * self.region_rows
        return start, min(start + self.region_rows, self.n_obs)


def plan_regions(n_obs: int, region_rows: int | None = None) -> RegionPlan:
    """Regions of ``region_rows`` rows (default ``OBSM_CHUNK_ROWS``): a multiple of the chunk, or one chunk."""
    if n_obs < 1:
        raise InputError("the store has no cells; nothing to embed")
    rows = OBSM_CHUNK_ROWS if region_rows is None else int(region_rows)
    if rows < 1 or (rows > OBSM_CHUNK_ROWS and rows % OBSM_CHUNK_ROWS):
        raise InputError(
            f"region rows must be a multiple of {OBSM_CHUNK_ROWS} (the obsm chunk) or below it; got {rows}"
        )
    rows = min(rows, n_obs)  # one region covers a small store whole
    return RegionPlan(n_obs, rows, min(rows, OBSM_CHUNK_ROWS))


def model_hash(model: VAE, var_names: Sequence[str], batch_categories: Sequence[str]) -> str:
    """SHA-256 of the weights (names, dtypes, shapes, bytes), the model config, genes and batch categories."""
    digest = hashlib.sha256()
    meta = {"config": repr(model.config), "genes": list(var_names), "batches": list(batch_categories)}
    digest.update(json.dumps(meta).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EmbedJob:
    """What every worker needs to write its regions (plain data: it travels to processes and Ray tasks).

    ``gene_idx`` selects the model's genes among the store's (None: the store's genes are the model's).
    """

    store_url: str
    outputs: tuple[str, ...]
    widths: tuple[int, ...]
    plan: RegionPlan
    batch_size: int
    model_hash: str
    batch_key: str | None
    batch_categories: tuple[str, ...]
    gene_idx: tuple[int, ...] | None = None
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(OUTPUT_KEYS[o] for o in self.outputs)

    # what a subclass (another per-cell output, e.g. infer.expression.NormalizedJob) changes: where its manifest
    # and marks live, what else decides its bytes, and how a region's values are computed
    @property
    def manifest(self) -> str:
        return MANIFEST

    @property
    def marks(self) -> str:
        return MARKS

    def token_extra(self) -> dict[str, Any]:
        return {}

    def region_values(self, model: VAE, view: Any, codes: np.ndarray, region: int) -> dict[str, np.ndarray]:
        return region_outputs(model, view, codes, self, region)

    @cached_property
    def token(self) -> int:
        """A non-zero 64-bit fingerprint of everything that decides the bytes written."""
        what = {
            "writer": WRITER_VERSION,
            "model": self.model_hash,
            "outputs": list(self.outputs),
            "widths": list(self.widths),
            "batch_size": self.batch_size,
            "n_obs": self.plan.n_obs,
            "region_rows": self.plan.region_rows,
            "chunk_rows": self.plan.chunk_rows,
            "genes": None if self.gene_idx is None else hashlib.sha256(np.asarray(self.gene_idx).tobytes()).hexdigest(),
            "device": torch.device(self.device).type,
            "seed": self.seed,
            **self.token_extra(),
        }
        value = int.from_bytes(hashlib.sha256(json.dumps(what, sort_keys=True).encode()).digest()[:8], "little")
        return value or 1


@dataclass(frozen=True)
class Begun:
    """The state :func:`begin` found: regions to write, their marks before this run, whether all was done."""

    pending: list[int]
    prior: np.ndarray
    already_complete: bool
    replaced: str | None = None  # the model hash of the embedding this run replaces


@dataclass(frozen=True)
class EmbedSummary:
    """What :func:`scvi_scale.api.embed_to_store` did."""

    store: str
    keys: tuple[str, ...]
    n_obs: int
    n_regions: int
    written: int
    skipped: int
    cells: int
    complete: bool
    seconds: float
    model_hash: str
    workers: int = 1
    launcher: str = "local"
    replaced: str | None = None

    def __repr__(self) -> str:
        what = f"obsm {', '.join(self.keys)} of {self.n_obs} cells in {self.n_regions} regions"
        if self.written == 0 and self.complete:
            return f"EmbedSummary({self.store!r}: {what} already complete, nothing to do; model {self.model_hash[:12]})"
        rate = self.cells / max(self.seconds, 1e-9)
        state = "complete" if self.complete else "INCOMPLETE (rerun to finish)"
        return (
            f"EmbedSummary({self.store!r}: {what}; wrote {self.written}, {self.skipped} already committed, "
            f"{state}; {self.seconds:.1f} s, ~{rate:,.0f} cells/s, {self.workers} {self.launcher} worker(s); "
            f"model {self.model_hash[:12]}" + (f", replaced model {self.replaced[:12]}" if self.replaced else "") + ")"
        )


def _manifest(store: RegionStore, name: str = MANIFEST) -> dict[str, Any] | None:
    value = store.metadata.get(name)
    return json.loads(value) if isinstance(value, str) else value  # TileDB keeps metadata entries as JSON text


def begin(store: RegionStore, job: EmbedJob, record: dict[str, Any]) -> Begun:
    """Make the arrays and marks ready and find the regions left to write; write nothing when all are done.

    ``record`` is what the manifest says besides the writer's own fields (run, config, ...). The manifest is
    set incomplete before any array changes; commit marks are reset before any array is (re)created, so that
    no mark ever outlives its data.
    """
    plan, token = job.plan, job.token
    manifest = _manifest(store, job.manifest)
    marks = store.read_marks(job.marks)
    sized = marks is not None and marks.shape == (plan.n_regions,)
    same = manifest is not None and manifest.get("token") == f"{token:016x}"
    if same and manifest.get("complete") and sized and bool((marks == token).all()):
        return Begun([], marks, True)
    replaced = manifest.get("model_hash") if manifest and manifest.get("model_hash") != job.model_hash else None
    if not same or manifest.get("complete"):
        store.update_metadata(job.manifest, {**record, **_writer_fields(job), "complete": False})
    for key in set((manifest or {}).get("keys", {}).values()) - set(job.keys):  # stale outputs of another run
        store.delete_obsm(key)
    fresh = [
        (key, width)
        for key, width in zip(job.keys, job.widths, strict=True)
        if store.obsm_layout(key) != (plan.n_obs, width, plan.chunk_rows)
    ]
    if fresh or not sized:
        store.create_marks(job.marks, plan.n_regions)
        marks = np.zeros(plan.n_regions, dtype=np.uint64)
    for key, width in fresh:
        store.create_obsm(key, width, plan.chunk_rows)
    assert marks is not None
    pending = [r for r in range(plan.n_regions) if int(marks[r]) != token]
    log.info("%s: %d of %d regions to write", store.source, len(pending), plan.n_regions)
    return Begun(pending, marks, False, replaced)


def _writer_fields(job: EmbedJob) -> dict[str, Any]:
    return {
        "version": WRITER_VERSION,
        "token": f"{job.token:016x}",
        "model_hash": job.model_hash,
        "n_obs": job.plan.n_obs,
        "outputs": list(job.outputs),
        "keys": dict(zip(job.outputs, job.keys, strict=True)),
        "batch_size": job.batch_size,
        "region_rows": job.plan.region_rows,
        "n_regions": job.plan.n_regions,
        "marks": f"uns/{job.marks}",
    }


def finish(store: RegionStore, job: EmbedJob, record: dict[str, Any]) -> bool:
    """Write the manifest as complete when every region's mark holds the token; return whether it did."""
    marks = store.read_marks(job.marks)
    if marks is None or marks.shape != (job.plan.n_regions,) or not bool((marks == job.token).all()):
        return False
    store.update_metadata(job.manifest, {**record, **_writer_fields(job), "complete": True, "completed": utc_now()})
    return True


def _fault_point(stage: str, region: int) -> None:
    """Called after each step of a region's write (``"written"``, ``"committed"``); tests make it raise there."""


@torch.no_grad()
def region_outputs(model: VAE, view: Any, codes: np.ndarray, job: EmbedJob, region: int) -> dict[str, np.ndarray]:
    """The outputs of one region, from minibatches starting at its first row (independent of who runs it).

    ``latent``: posterior mean of z; ``latent_var``: its variance; ``library``: log total counts over the
    model's genes (an observed library), or the posterior mean of the log library (a latent one).
    """
    start, stop = job.plan.bounds(region)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in job.outputs}
    seed = int(np.random.SeedSequence([job.seed, region]).generate_state(1)[0])
    with torch.random.fork_rng(devices=[]):  # a logistic-normal mean is a Monte Carlo average: seeded per region
        torch.manual_seed(seed)
        for lo in range(start, stop, job.batch_size):
            hi = min(lo + job.batch_size, stop)
            x = sp.csr_matrix(view.read_range(lo, hi), dtype=np.float32)
            x_ng, batch_n = torch.from_numpy(x.toarray()), torch.from_numpy(np.asarray(codes[lo:hi], np.int64))
            if "latent" in parts or "latent_var" in parts:
                mean, var, _ = latent_representation(model, [Batch(x_ng, batch_n, np.arange(lo, hi))], job.device)
                for name, value in (("latent", mean), ("latent_var", var)):
                    if name in parts:
                        parts[name].append(value)
            if "library" in parts:
                parts["library"].append(_library(model, x, x_ng, batch_n, job.device))
    return {name: np.concatenate(chunks).astype(np.float32, copy=False) for name, chunks in parts.items()}


def _library(model: VAE, x: sp.csr_matrix, x_ng: torch.Tensor, batch_n: torch.Tensor, device: str) -> np.ndarray:
    if model.l_encoder is None:  # observed: log total counts, summed in float64 (exact for counts)
        return np.log(np.asarray(x.sum(axis=1, dtype=np.float64))).astype(np.float32)
    was_training = model.training
    model.eval()
    x_in = torch.log1p(x_ng) if model.config.log_variational else x_ng
    ql_m, _ = model.l_encoder(x_in.to(device), batch_n.to(device))
    model.train(was_training)
    return ql_m.float().cpu().numpy()


def write_region(store: RegionStore, view: Any, codes: np.ndarray, model: VAE, job: EmbedJob, region: int,
                 prior_mark: int) -> int:  # fmt: skip
    """Write one region and commit it (see the module docstring); return its number of cells."""
    token = job.token
    if prior_mark == token:
        return 0
    if prior_mark != 0:  # another embedding's region: its mark must not survive our partial data
        store.write_mark(job.marks, region, 0)
    start, stop = job.plan.bounds(region)
    values = job.region_values(model, view, codes, region)
    for name, key in zip(job.outputs, job.keys, strict=True):
        store.write_obsm(key, start, stop, values[name])
    _fault_point("written", region)
    store.write_mark(job.marks, region, token)
    _fault_point("committed", region)
    return stop - start


# ---- workers in other processes (spawned or Ray): the store reopened once per process ----

_opened: dict[tuple[str, int], tuple[Any, Any, np.ndarray]] = {}


def _open_for(job: EmbedJob) -> tuple[Any, Any, np.ndarray]:
    """(store, the view of the model's genes, batch codes) for ``job``, opened once per process."""
    key = (job.store_url, job.token)
    if key not in _opened:
        from scvi_scale.store.open import open_store
        from scvi_scale.store.subset import GeneSubset

        store = open_store(job.store_url, storage_options=job.storage_options)
        view = store if job.gene_idx is None else GeneSubset(store, list(job.gene_idx))
        codes, _ = store.batch_codes(job.batch_key, categories=list(job.batch_categories))
        _opened.clear()
        _opened[key] = (store, view, codes)
    return _opened[key]


def region_task(shared: tuple[EmbedJob, VAE], item: tuple[int, int]) -> tuple[int, int]:
    """Write region ``item[0]`` (its mark before the run: ``item[1]``) in a worker; return (region, cells).

    ``shared`` is (job, model); the store is opened once per worker process. For spawned processes and Ray tasks.
    """
    job, model = shared
    if job.threads:
        torch.set_num_threads(job.threads)
    store, view, codes = _open_for(job)
    model = model.to(job.device).eval()
    return item[0], write_region(store, view, codes, model, job, item[0], item[1])


_worker: dict[str, Any] = {}


def _init_process(job: EmbedJob, model_bytes: bytes) -> None:
    """Initializer of a spawned worker process: keep the job and the model for :func:`_process_task`."""
    _worker["shared"] = (job, pickle.loads(model_bytes).to(job.device).eval())


def _model_bytes(model: VAE) -> bytes:
    # plain pickle copies the weights: torch's multiprocessing reducers would share CPU storage by file
    # descriptor (and CUDA tensors by IPC), which this process would then have to keep alive
    return pickle.dumps(copy.deepcopy(model).cpu())


def _process_task(item: tuple[int, int]) -> tuple[int, int]:
    return region_task(_worker["shared"], item)


def run_processes(job: EmbedJob, model: VAE, items: list[tuple[int, int]], workers: int) -> Iterator[tuple[int, int]]:
    """Write ``items`` on ``workers`` spawned processes, one region per task; yield (region, cells) as they end."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_process,
        initargs=(job, _model_bytes(model)),
    )
    try:
        futures = [pool.submit(_process_task, item) for item in items]
        for future in as_completed(futures):
            yield future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(f"an embedding worker died ({exc}); rerun to finish (committed regions are kept)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
