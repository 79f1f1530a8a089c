"""The count stores in object storage: the local store checks, run on ``s3://`` URLs served by moto's S3 server.

Zarr is read through both clients (obstore, the default, and fsspec/s3fs); TileDB through its own S3 support.
Also: incomplete stores are refused over S3, options override the environment, errors are one line naming the
URL and what to check, and no credential ever shows up in a message, a repr or the logs.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.storage import FsspecStore, ObjectStore

from scvi_scale.store import InputError, MemoryStore, read_h5ad
from scvi_scale.store.convert import convert
from scvi_scale.store.open import open_store, resolve_location, s3_settings
from scvi_scale.store.zarr_store import CsrAppender, ZarrStore, create_layout, set_complete, write_elem
from tests.s3 import KEY_ID, SECRET, free_port, make_bucket, point_env_at, upload_tree

pytest.importorskip("obstore")
pytest.importorskip("s3fs")

BACKENDS = ["zarr-obstore", "zarr-fsspec", "tiledb"]
ZARR_BACKENDS = ["zarr-obstore", "zarr-fsspec"]
OPTIONS = {"zarr-obstore": {}, "zarr-fsspec": {"backend": "fsspec"}, "tiledb": {}}
OPTION_SECRET = "option-secret-must-not-leak"  # a second secret, given through storage_options


@pytest.fixture(scope="module")
def endpoint(s3_server: str):
    """The test server, with the ``AWS_*`` environment pointing at it for this module's fixtures and tests."""
    with pytest.MonkeyPatch.context() as mp:
        point_env_at(mp, s3_server)
        yield s3_server


@pytest.fixture(scope="module")
def source(small_atlas: Path) -> MemoryStore:
    return read_h5ad(small_atlas)


@pytest.fixture(scope="module")
def local_zarr(small_atlas: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s3zarr") / "small.zarr"
    # a small budget makes many row blocks, as in the local tests
    convert([small_atlas], out, batch_key="batch", memory_budget_bytes=2048 * 48, progress=False)
    return out


@pytest.fixture(scope="module")
def urls(endpoint: str, local_zarr: Path, small_atlas: Path) -> dict[str, str]:
    """One bucket holding the Zarr store (built locally, uploaded) and the TileDB store (written to S3)."""
    bucket = make_bucket(endpoint, "stores")
    zarr_url = upload_tree(local_zarr, f"{bucket}/small.zarr", endpoint)
    out = dict.fromkeys(ZARR_BACKENDS, zarr_url)
    try:
        from scvi_scale.store.tiledb_store import TileDBStore
    except ImportError:  # pragma: no cover - the tiledb extra is missing
        return out
    # 250-row blocks: several submits into the one fragment, as the local tests do
    TileDBStore.from_anndata(anndata.read_h5ad(small_atlas), f"{bucket}/small.tiledb", chunk_rows=250)
    return {**out, "tiledb": f"{bucket}/small.tiledb"}


def _open(urls: dict[str, str], backend: str):
    if backend not in urls:
        pytest.skip("the tiledb extra is not installed")
    return open_store(urls[backend], storage_options=OPTIONS[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_equal_the_source(urls, source: MemoryStore, backend: str) -> None:
    store = _open(urls, backend)
    if backend != "tiledb":  # the client asked for is the one used
        assert isinstance(store._root.store, ObjectStore if backend == "zarr-obstore" else FsspecStore)
    assert store.source == urls[backend] and store.metadata["complete"]
    assert (store.n_obs, store.n_vars) == (source.n_obs, source.n_vars)
    np.testing.assert_array_equal(store.var_names, source.var_names)
    pd.testing.assert_frame_equal(store.obs, source.obs)
    got = store.read_range(0, store.n_obs)
    assert got.dtype == np.float32 and (got != source.X).nnz == 0
    assert (store.read_range(299, 301) != source.X[299:301]).nnz == 0
    codes, cats = store.batch_codes("batch")
    ref_codes, ref_cats = source.batch_codes("batch")
    np.testing.assert_array_equal(codes, ref_codes)
    assert cats == ref_cats
    for got_b, want_b in zip(
        store.library_log_stats(codes, len(cats)), source.library_log_stats(codes, len(cats)), strict=True
    ):
        np.testing.assert_allclose(got_b, want_b, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_rows_any_order(urls, source: MemoryStore, backend: str) -> None:
    store = _open(urls, backend)
    rng = np.random.default_rng(0)
    for idx in (
        rng.integers(0, store.n_obs, 300),  # scattered, with repeats: zarr's coordinate-selection path
        np.r_[np.arange(10, 50), np.arange(400, 420), [5, 5, 599]],
        np.arange(0, 64),
    ):
        got = store.read_rows(idx)
        assert got.shape == (idx.size, store.n_vars) and (got != source.X[idx]).nnz == 0
    assert store.read_rows(np.array([], dtype=np.int64)).shape == (0, store.n_vars)
    with pytest.raises(IndexError):
        store.read_rows(np.array([store.n_obs]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_obsm_written_by_region_reads_back(urls, backend: str) -> None:
    store = _open(urls, backend)
    key = f"X_{backend.replace('-', '_')}"  # the two Zarr clients share one store
    z = np.random.default_rng(1).normal(size=(store.n_obs, 3)).astype(np.float32)
    store.write_obsm(key, 300, store.n_obs, z[300:])  # the later region first, as another rank might
    store.write_obsm(key, 0, 300, z[:300])
    np.testing.assert_array_equal(_open(urls, backend).read_obsm(key), z)  # a fresh handle sees both regions
    np.testing.assert_array_equal(store.read_obsm(key, 10, 20), z[10:20])
    if backend != "tiledb":  # and anndata reads the remote store with the embedding in place
        location, _ = resolve_location(urls[backend], OPTIONS[backend])
        adata = anndata.read_zarr(location)
        np.testing.assert_array_equal(adata.obsm[key], z)
        assert adata.shape == (store.n_obs, store.n_vars)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickled_store_reads(urls, source: MemoryStore, backend: str) -> None:
    clone = pickle.loads(pickle.dumps(_open(urls, backend)))
    assert (clone.read_rows(np.array([3, 1, 598])) != source.X[[3, 1, 598]]).nnz == 0


@pytest.mark.parametrize("backend", ZARR_BACKENDS)
def test_incomplete_zarr_store_is_refused(s3_bucket: str, s3_env: str, local_zarr: Path, backend: str) -> None:
    url = upload_tree(local_zarr, f"{s3_bucket}/copy.zarr", s3_env)
    location, _ = resolve_location(url, OPTIONS[backend], read_only=False)
    set_complete(zarr.open_group(location, mode="r+"), False)
    with pytest.raises(InputError, match=r"incomplete \(an interrupted conversion\?\)"):
        ZarrStore(url, storage_options=OPTIONS[backend])
    zarr.open_group(resolve_location(f"{url[:-5]}-plain.zarr", read_only=False)[0], mode="w").create_group("X")
    with pytest.raises(InputError, match="not a scvi-scale count store"):
        ZarrStore(f"{url[:-5]}-plain.zarr", storage_options=OPTIONS[backend])


@pytest.mark.parametrize("backend", ZARR_BACKENDS)
def test_layout_written_directly_to_s3(s3_bucket: str, source: MemoryStore, backend: str) -> None:
    # convert writes locally and renames; the layout writer itself (resizes, whole shards, the flag) works remotely
    url = f"{s3_bucket}/direct.zarr"
    location, _ = resolve_location(url, OPTIONS[backend], read_only=False)
    root = create_layout(location, source.var_names, np.dtype(np.uint16), {"batch_key": "batch", "provenance": []})
    writer = CsrAppender(root)
    for start in range(0, source.n_obs, 128):
        writer.append(source.X[start : start + 128])
    writer.close()
    write_elem(root, "obs", source.obs)
    set_complete(root, True)
    store = open_store(url, storage_options=OPTIONS[backend])
    assert (store.read_range(0, store.n_obs) != source.X).nnz == 0
    pd.testing.assert_frame_equal(store.obs, source.obs)


def _interrupted(x):
    yield x[:250]
    raise RuntimeError("source went away")


def test_interrupted_tiledb_write_is_refused(s3_bucket: str, source: MemoryStore) -> None:
    tiledb_store = pytest.importorskip("scvi_scale.store.tiledb_store")
    uri = f"{s3_bucket}/atlas.tiledb"
    with pytest.raises(RuntimeError, match="source went away"):  # S3 has no rename: only the flag protects readers
        tiledb_store.TileDBStore.create(uri, source.var_names, source.obs, _interrupted(source.X))
    with pytest.raises(InputError, match="is incomplete .*; rerun the conversion"):
        open_store(uri)
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        tiledb_store.TileDBStore.create(uri, source.var_names, source.obs, [source.X])
    tiledb_store.TileDBStore.create(uri, source.var_names, source.obs, [source.X], overwrite=True)
    assert (open_store(uri).read_range(590, 600) != source.X[590:600]).nnz == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_storage_options_override_the_environment(urls, endpoint: str, monkeypatch, backend: str) -> None:
    if backend not in urls:
        pytest.skip("the tiledb extra is not installed")
    # the environment points at nothing and carries no keys; the config entry has all it takes
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    opts = {**OPTIONS[backend], "endpoint_url": endpoint, "key": KEY_ID, "secret": OPTION_SECRET, "region": "us-east-1"}
    store = open_store(urls[backend], storage_options=opts)
    assert store.read_range(0, 5).shape == (5, store.n_vars)


def test_settings_and_tiledb_config_from_options(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-host:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    settings = s3_settings({"endpoint_url": "http://minio:9000", "key": "me", "secret": OPTION_SECRET, "region": "x"})
    assert (settings.endpoint_url, settings.key, settings.secret, settings.region) == (
        "http://minio:9000", "me", OPTION_SECRET, "x"
    )  # fmt: skip
    assert OPTION_SECRET not in repr(settings) and "key=" not in repr(settings)
    assert s3_settings({}).secret == SECRET and s3_settings({"key": "me"}).secret is None  # never mixed
    tiledb_store = pytest.importorskip("scvi_scale.store.tiledb_store")
    cfg = tiledb_store.tiledb_config("s3://b/x.tiledb", storage_options={"endpoint_url": "http://minio:9000"})
    assert cfg["vfs.s3.endpoint_override"] == "minio:9000" and cfg["vfs.s3.scheme"] == "http"
    assert cfg["vfs.s3.use_virtual_addressing"] == "false" and cfg["vfs.s3.aws_secret_access_key"] == SECRET
    cfg = tiledb_store.tiledb_config("s3://b/x.tiledb", storage_options={"anon": True})
    assert cfg["vfs.s3.no_sign_request"] == "true" and "vfs.s3.aws_secret_access_key" not in cfg


def _assert_one_clean_line(err: pytest.ExceptionInfo, url: str, *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text and text.startswith(url), text
    for needle in needles:
        assert needle in text, text
    for secret in (SECRET, OPTION_SECRET):
        assert secret not in text and secret not in repr(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_url_and_never_the_credentials(urls, endpoint: str, caplog, backend: str) -> None:
    caplog.set_level(logging.DEBUG)
    opts = {**OPTIONS[backend], "key": KEY_ID, "secret": OPTION_SECRET}
    name = "x.tiledb" if backend == "tiledb" else "x.zarr"
    if backend not in urls:
        pytest.skip("the tiledb extra is not installed")
    store = open_store(urls[backend], storage_options=opts)  # opening and reading log at debug level
    store.read_range(0, 10)
    for text in (repr(store), str(store)):
        assert SECRET not in text and OPTION_SECRET not in text
    what = f"no {'TileDB' if backend == 'tiledb' else 'Zarr'} store found there; check the bucket"
    for use_options in (False, True):  # the secret from the environment, then from storage_options
        with pytest.raises(InputError) as err:
            open_store(f"s3://no-such-bucket/{name}", storage_options=opts if use_options else OPTIONS[backend])
        _assert_one_clean_line(err, f"s3://no-such-bucket/{name}", what)
    # Not through s3fs: zarr reads the metadata keys concurrently, and when the connection fails the others'
    # aiobotocore coroutines are left behind and complain at interpreter exit (after seconds of retries).
    if backend != "zarr-fsspec":
        dead = {**opts, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
        with pytest.raises(InputError) as err:
            open_store(urls[backend], storage_options=dead)
        _assert_one_clean_line(err, urls[backend], "cannot open the", "AWS_ENDPOINT_URL")
    assert caplog.text and SECRET not in caplog.text and OPTION_SECRET not in caplog.text


def test_client_choice_and_missing_clients(s3_env, monkeypatch) -> None:
    import scvi_scale.store.open as open_mod

    url = "s3://bucket/atlas.zarr"
    assert isinstance(resolve_location(url)[0], ObjectStore)
    assert isinstance(resolve_location(url, {"client_kwargs": {}})[0], FsspecStore)  # fsspec-only option
    with pytest.raises(InputError, match="fsspec options; obstore takes only"):
        resolve_location(url, {"backend": "obstore", "client_kwargs": {}})
    with pytest.raises(InputError, match="backend must be one of"):
        resolve_location(url, {"backend": "boto"})
    assert isinstance(resolve_location("gs://bucket/atlas.zarr", {"anon": True})[0], ObjectStore)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    assert isinstance(resolve_location(url)[0], FsspecStore)  # region unknown: s3fs looks it up, obstore would not
    assert isinstance(resolve_location(url, {"region": "eu-west-1"})[0], ObjectStore)
    monkeypatch.setattr(open_mod, "_has", lambda module: module != "obstore")
    assert isinstance(resolve_location(url)[0], FsspecStore)  # no obstore: s3fs
    monkeypatch.setattr(open_mod, "_has", lambda module: False)
    with pytest.raises(
        InputError, match=r"needs obstore or s3fs; install the s3 extra: pip install 'scvi-scale\[s3\]'"
    ):
        open_store(url, storage_options={"secret": OPTION_SECRET})
