"""Fixtures of the API tests: a count store in the S3 test server, made once by ``ss.convert`` for the session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_atlas(s3_server: str, small_atlas: Path) -> str:
    """``s3://<bucket>/atlas.zarr``: the small atlas (600 cells x 200 genes, 3 batches), converted by ``ss.convert``.

    Tests that read it ask for ``s3_env`` too (the ``AWS_*`` environment pointing at the server).
    """
    import scvi_scale as ss
    from tests.s3 import make_bucket, point_env_at

    with pytest.MonkeyPatch.context() as mp:
        point_env_at(mp, s3_server)
        url = f"{make_bucket(s3_server, 'api')}/atlas.zarr"
        ss.convert([small_atlas], url, batch_key="batch", progress=False)
    return url
