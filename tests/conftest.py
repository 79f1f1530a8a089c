"""Shared fixtures: a small synthetic atlas written once per session, the real data folder, an S3 test server."""

from __future__ import annotations

import os

# OpenBLAS threads spinning against torch's on two cores made numpy's eigh 25-50x slower; pin them first
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# two cores: one torch thread keeps tests from fighting each other and the loader
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_atlas(tmp_path_factory) -> Path:
    """600 cells x 200 genes, 3 batches, 4 cell types, as an .h5ad."""
    from scvi_scale.datasets.synthetic import SyntheticSpec, write_h5ad

    path = tmp_path_factory.mktemp("atlas") / "small.h5ad"
    write_h5ad(SyntheticSpec(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, seed=7), path)
    return path


def _forget_s3fs_listings() -> None:
    """Drop the directory listings that cached s3fs instances hold, so no test sees another's.

    The instances themselves stay: zarr opens s3fs in async mode, whose aiohttp session is never closed when
    the instance is garbage-collected, so ``clear_instance_cache`` would turn into "Unclosed client session"
    ResourceWarnings (errors here) in whichever test happens to collect them.
    """
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        import s3fs

        for fs in list(getattr(s3fs.S3FileSystem, "_cache", {}).values()):
            fs.invalidate_cache()


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of an S3-compatible server (moto's) on 127.0.0.1, for the whole session.

    It sets no environment variables, so that tests which do not ask for S3 never see them: use ``s3_env`` or
    ``s3_bucket`` (or, for a module-scoped fixture, ``tests.s3.s3_env`` with ``pytest.MonkeyPatch.context``).
    """
    pytest.importorskip("moto.server", reason="S3 tests need moto[server] (the dev extra)")
    pytest.importorskip("boto3", reason="S3 tests need boto3 (the dev extra)")
    from tests.s3 import MotoServer

    with MotoServer() as server:
        yield server.endpoint


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point ``AWS_ENDPOINT_URL``, dummy ``AWS_*`` keys and the region at the test server for one test."""
    from tests.s3 import s3_env as env_for

    for name, value in env_for(s3_server).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: str):
    """A fresh, empty bucket on the test server, as ``s3://<bucket>``, with the environment pointing at it."""
    from tests.s3 import make_bucket

    _forget_s3fs_listings()
    yield make_bucket(s3_env)
    _forget_s3fs_listings()
