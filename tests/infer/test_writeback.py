"""Embeddings written back into the store, region by region: the same arrays as the in-memory embedding, for
Zarr and TileDB, local and on S3; a crash at any step and a rerun give the bytes of an uninterrupted run; two
writer processes at once, 1 and 2 worker processes and Ray tasks write the same bytes; mismatches are one line."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest

from scvi_scale import api
from scvi_scale.infer import writeback
from scvi_scale.store.convert import convert
from scvi_scale.store.errors import InputError
from scvi_scale.store.open import open_store

ALL = ("latent", "latent_var", "library")
KEYS = ("X_scvi", "X_scvi_var", "X_scvi_library")
# 600 cells in regions of 128 rows: 5 regions, the last one partial; 64-cell minibatches inside each
REGION, BATCH = 128, 64
TRAIN = {"data": {"batch_key": "batch", "batch_size": 128}, "model": {"n_hidden": 32, "n_latent": 6},
         "train": {"max_epochs": 2, "progress": False, "num_threads": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def stores(small_atlas: Path, tmp_path_factory) -> dict[str, Path]:
    """The 600 x 200 atlas as Zarr and TileDB stores, and as a store of its first 150 genes (another model's)."""
    root = tmp_path_factory.mktemp("writeback")
    adata = anndata.read_h5ad(small_atlas)
    adata[:, :150].copy().write_h5ad(root / "genes150.h5ad")
    out = {
        "zarr": convert([small_atlas], root / "atlas.zarr", batch_key="batch", progress=False),
        "tiledb": convert([small_atlas], root / "atlas.tiledb", batch_key="batch", progress=False),
        "genes150": convert([root / "genes150.h5ad"], root / "genes150.zarr", batch_key="batch", progress=False),
    }
    return {name: Path(store.source) for name, store in out.items()}


@pytest.fixture(scope="module")
def run_a(stores: dict[str, Path], tmp_path_factory) -> api.Run:
    return api.train(stores["zarr"], tmp_path_factory.mktemp("runs") / "a", **TRAIN)


@pytest.fixture(scope="module")
def run_b(stores: dict[str, Path], tmp_path_factory) -> api.Run:
    """Another model, on 150 of the genes: it reads the 200-gene stores through a gene subset."""
    train = {**TRAIN, "train": {**TRAIN["train"], "seed": 1, "max_epochs": 1}}
    return api.train(stores["genes150"], tmp_path_factory.mktemp("runs") / "b", **train)


@pytest.fixture(scope="module")
def reference(run_a: api.Run, stores: dict[str, Path]) -> anndata.AnnData:
    return api.embed(run_a, stores["zarr"])


@pytest.fixture(scope="module")
def uninterrupted(run_a: api.Run, stores: dict[str, Path], tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The bytes of every output after one uninterrupted in-process run, per backend."""
    out = {}
    for backend in ("zarr", "tiledb"):
        path = _copy(stores[backend], tmp_path_factory.mktemp("once"))
        assert api.embed_to_store(run_a, path, ALL, region_rows=REGION, batch_size=BATCH).complete
        out[backend] = _bytes(path)
    return out


def _copy(store: Path, where: Path) -> Path:
    return Path(shutil.copytree(store, where / store.name))


def _bytes(store: str | Path, keys: tuple[str, ...] = KEYS) -> dict[str, bytes]:
    opened = open_store(store)
    return {key: opened.read_obsm(key).tobytes() for key in keys}


def _check_against_reference(store: object, reference: anndata.AnnData) -> None:
    x_scvi = store.read_obsm("X_scvi")
    assert x_scvi.dtype == np.float32 and x_scvi.shape == (600, 6)
    np.testing.assert_allclose(x_scvi, reference.obsm["X_scvi"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(store.read_obsm("X_scvi_var"), reference.obsm["X_scvi_var"], rtol=1e-6, atol=1e-7)
    totals = np.asarray(store.read_range(0, store.n_obs).sum(axis=1), dtype=np.float64)
    np.testing.assert_allclose(store.read_obsm("X_scvi_library"), np.log(totals), rtol=1e-6)


@pytest.mark.parametrize("backend", ["zarr", "tiledb"])
def test_local_store_equals_in_memory_embedding_and_rerun_does_nothing(backend, stores, run_a, reference, tmp_path):
    path = _copy(stores[backend], tmp_path)
    summary = api.embed_to_store(run_a.path, path, ALL, region_rows=REGION, batch_size=BATCH)
    assert (summary.complete, summary.n_regions, summary.written, summary.skipped) == (True, 5, 5, 0)
    assert "complete" in repr(summary) and "cells/s" in repr(summary)
    store = open_store(path)
    _check_against_reference(store, reference)
    manifest = store.metadata["embed"]
    manifest = manifest if isinstance(manifest, dict) else json.loads(manifest)  # TileDB keeps JSON text
    assert manifest["complete"] and manifest["n_obs"] == 600 and manifest["outputs"] == list(ALL)
    assert manifest["model_hash"] == summary.model_hash and manifest["config"]["model"]["n_latent"] == 6
    if backend == "zarr":  # what scanpy users open
        adata = anndata.read_zarr(path)
        np.testing.assert_array_equal(adata.obsm["X_scvi"], store.read_obsm("X_scvi"))
        assert adata.obsm["X_scvi_library"].shape == (600, 1)
    again = api.embed_to_store(run_a.path, path, ALL, region_rows=REGION, batch_size=BATCH)
    assert (again.complete, again.written, again.skipped) == (True, 0, 5)
    assert "nothing to do" in repr(again)


@pytest.mark.parametrize("backend", ["zarr", "tiledb"])
def test_s3_store(backend, small_atlas, s3_bucket, run_a, reference, uninterrupted):
    pytest.importorskip("obstore")
    url = f"{s3_bucket}/atlas.{backend}"
    convert([small_atlas], url, batch_key="batch", progress=False)
    summary = api.embed_to_store(run_a, url, ALL, region_rows=REGION, batch_size=BATCH)
    assert summary.complete and summary.written == 5
    _check_against_reference(open_store(url), reference)
    assert _bytes(url) == uninterrupted[backend]
    assert api.embed_to_store(run_a, url, ALL, region_rows=REGION, batch_size=BATCH).written == 0
    if backend == "zarr":
        import zarr

        from scvi_scale.store.open import resolve_location

        adata = anndata.read_zarr(zarr.open_group(resolve_location(url)[0], mode="r"))
        np.testing.assert_array_equal(adata.obsm["X_scvi"], open_store(url).read_obsm("X_scvi"))


class Crash(Exception):
    """Stands in for a kill at one step of a region's write."""


def _crash_at(monkeypatch, stage: str, nth: int) -> None:
    seen: list[int] = []

    def fault(at: str, region: int) -> None:
        if at == stage:
            seen.append(region)
            if len(seen) == nth:
                raise Crash(f"{stage} region {region}")

    monkeypatch.setattr(writeback, "_fault_point", fault)


@pytest.mark.parametrize(
    ("backend", "stage", "committed"),
    [("zarr", "written", 2), ("zarr", "committed", 3), ("tiledb", "written", 1), ("tiledb", "committed", 4)],
)
def test_crash_then_rerun_is_byte_identical(backend, stage, committed, stores, run_a, uninterrupted, tmp_path,
                                            monkeypatch):  # fmt: skip
    path = _copy(stores[backend], tmp_path)
    # crash after the data of region `committed` ("written": before its mark) or after its mark ("committed")
    _crash_at(monkeypatch, stage, committed + 1 if stage == "written" else committed)
    with pytest.raises(Crash):
        api.embed_to_store(run_a, path, ALL, region_rows=REGION, batch_size=BATCH)
    monkeypatch.setattr(writeback, "_fault_point", lambda at, region: None)
    store = open_store(path)
    assert int((store.read_marks(writeback.MARKS) != 0).sum()) == committed
    manifest = store.metadata["embed"]
    assert '"complete": false' in manifest if isinstance(manifest, str) else not manifest["complete"]
    summary = api.embed_to_store(run_a, path, ALL, region_rows=REGION, batch_size=BATCH)
    assert (summary.complete, summary.skipped, summary.written) == (True, committed, 5 - committed)
    assert _bytes(path) == uninterrupted[backend]


def test_another_model_replaces_and_a_crash_mid_replace_is_safe(stores, run_a, run_b, uninterrupted, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """A, then B killed mid-way, then A again: the regions B touched are rewritten, the result is A's bytes."""
    path = _copy(stores["zarr"], tmp_path)
    assert api.embed_to_store(run_a, path, ALL, region_rows=REGION, batch_size=BATCH).complete
    _crash_at(monkeypatch, "written", 3)  # B commits regions 0 and 1, writes region 2's data but not its mark
    with pytest.raises(Crash):
        api.embed_to_store(run_b, path, ALL, region_rows=REGION, batch_size=BATCH)
    monkeypatch.setattr(writeback, "_fault_point", lambda at, region: None)
    store = open_store(path)
    assert not store.metadata["embed"]["complete"]
    marks = store.read_marks(writeback.MARKS)
    assert marks[2] == 0 and len(set(marks.tolist())) == 3  # B's, cleared (region 2, holding B's data), A's
    summary = api.embed_to_store(run_a, path, ALL, region_rows=REGION, batch_size=BATCH)
    assert summary.replaced == writeback.model_hash(run_b.model, run_b.var_names, run_b.batch_categories)
    assert (summary.written, summary.skipped, summary.complete) == (3, 2, True)
    assert _bytes(path) == uninterrupted["zarr"]
    # a finished run of B with fewer outputs removes A's others: they would no longer match X_scvi
    assert api.embed_to_store(run_b, path, ("latent",), region_rows=REGION, batch_size=BATCH).complete
    adata = anndata.read_zarr(path)
    assert list(adata.obsm) == ["X_scvi"] and open_store(path).metadata["embed"]["outputs"] == ["latent"]


def test_model_on_fewer_genes_reads_its_genes_by_name(stores, run_b, tmp_path):
    path = _copy(stores["zarr"], tmp_path)
    summary = api.embed_to_store(run_b, path, ("latent",), region_rows=REGION, batch_size=BATCH)
    assert summary.complete
    np.testing.assert_allclose(
        open_store(path).read_obsm("X_scvi"), api.embed(run_b, stores["genes150"]).obsm["X_scvi"], rtol=1e-6, atol=1e-6
    )


def test_latent_library_and_logistic_normal_mean_per_region(stores):
    """A latent library is written as its posterior mean; a logistic-normal mean (Monte Carlo) is seeded per
    region, so a region gives the same bytes however often, and by whichever worker, it is computed."""
    import torch

    from scvi_scale.model import VAE, ModelConfig

    store = open_store(stores["zarr"])
    codes, _ = store.batch_codes("batch")
    torch.manual_seed(0)
    config = ModelConfig(n_hidden=16, n_latent=4, latent_distribution="ln", use_observed_lib_size=False)
    model = VAE(200, 3, config, np.full(3, 7.0), np.ones(3)).eval()
    job = writeback.EmbedJob(
        store_url=str(stores["zarr"]), outputs=ALL, widths=(4, 4, 1), plan=writeback.plan_regions(600, REGION),
        batch_size=BATCH, model_hash="m", batch_key="batch", batch_categories=("0", "1", "2"),
    )  # fmt: skip
    first = writeback.region_outputs(model, store, codes, job, 1)
    again = writeback.region_outputs(model, store, codes, job, 1)
    assert all(first[k].tobytes() == again[k].tobytes() for k in ALL)
    assert first["latent"].shape == (128, 4) and np.allclose(first["latent"].sum(axis=1), 1.0, atol=1e-5)
    x = torch.from_numpy(store.read_range(128, 256).toarray())
    with torch.no_grad():
        ql_m, _ = model.l_encoder(torch.log1p(x), torch.from_numpy(codes[128:256]))
    np.testing.assert_allclose(first["library"], ql_m.numpy(), rtol=1e-6, atol=1e-6)
    assert writeback.region_outputs(model, store, codes, job, 2)["latent"].tobytes() != first["latent"].tobytes()


def _write_share(job: writeback.EmbedJob, model_bytes: bytes, items: list, barrier) -> None:
    """One of two writer processes: wait for the other, then write its regions."""
    import torch

    torch.set_num_threads(1)
    shared = (job, pickle.loads(model_bytes))
    barrier.wait(timeout=120)
    for item in items:
        writeback.region_task(shared, item)


def test_two_writer_processes_at_once(stores, run_a, uninterrupted, tmp_path):
    path = _copy(stores["zarr"], tmp_path)
    store = open_store(path)
    job = writeback.EmbedJob(
        store_url=str(path), outputs=ALL, widths=(6, 6, 1), plan=writeback.plan_regions(600, REGION),
        batch_size=BATCH, model_hash=writeback.model_hash(run_a.model, run_a.var_names, run_a.batch_categories),
        batch_key="batch", batch_categories=tuple(run_a.batch_categories), seed=run_a.config.train.seed,
    )  # fmt: skip
    state = writeback.begin(store, job, {"run": str(run_a.path)})
    items = [(r, int(state.prior[r])) for r in state.pending]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    model_bytes = pickle.dumps(run_a.model)
    procs = [ctx.Process(target=_write_share, args=(job, model_bytes, items[i::2], barrier)) for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert writeback.finish(store, job, {"run": str(run_a.path)})
    assert _bytes(path) == uninterrupted["zarr"]


def test_two_worker_processes_equal_one(stores, run_a, uninterrupted, tmp_path):
    path = _copy(stores["zarr"], tmp_path)
    summary = api.embed_to_store(run_a, path, ALL, workers=2, threads=1, region_rows=REGION, batch_size=BATCH)
    assert summary.complete and summary.written == 5 and summary.workers == 2
    assert _bytes(path) == uninterrupted["zarr"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_tasks_equal_one_process(stores, run_a, uninterrupted, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    path = _copy(stores["tiledb"], tmp_path)
    summary = api.embed_to_store(run_a, path, ALL, "ray", 2, threads=1, region_rows=REGION, batch_size=BATCH)
    assert summary.complete and summary.written == 5 and summary.launcher == "ray"
    assert _bytes(path) == uninterrupted["tiledb"]


def test_mismatches_are_one_line(stores, run_a, small_atlas, tmp_path):
    with pytest.raises(InputError, match="150 genes, but the model was trained on 200") as err:
        api.embed_to_store(run_a, stores["genes150"])
    assert "\n" not in str(err.value)
    adata = anndata.read_h5ad(small_atlas)
    adata.obs["batch"] = adata.obs["batch"].astype(str).radd("other-")
    adata.write_h5ad(tmp_path / "other.h5ad")
    other = convert([tmp_path / "other.h5ad"], tmp_path / "other.zarr", batch_key="batch", progress=False)
    with pytest.raises(InputError) as err:
        api.embed_to_store(run_a, other.source)
    assert "other-" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="written back into .zarr/.tiledb stores; for an .h5ad write a new file"):
        api.embed_to_store(run_a, small_atlas)
    with pytest.raises(InputError, match="unknown outputs"):
        api.embed_to_store(run_a, stores["zarr"], ("latent", "umap"))
    with pytest.raises(InputError, match="multiple of 16384"):
        api.embed_to_store(run_a, stores["zarr"], region_rows=20_000)
    assert not os.path.exists(stores["genes150"] / "obsm" / "X_scvi")  # nothing was written on a refusal
