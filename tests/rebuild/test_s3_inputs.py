"""Inputs in object storage: listed under a prefix, downloaded (streamed) and ingested; then nothing new."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scvi_scale import api
from scvi_scale.rebuild import rebuild
from scvi_scale.rebuild.run import LEDGER
from scvi_scale.rebuild.sources import list_sources
from scvi_scale.store.zarr_store import ZarrStore
from tests.rebuild.conftest import make_config
from tests.s3 import upload_tree

pytestmark = pytest.mark.slow


def test_inputs_from_s3(tmp_path: Path, atlas_parts: list[Path], s3_bucket: str, s3_env: str) -> None:
    local = tmp_path / "upload"
    (local / "nights").mkdir(parents=True)
    for part in atlas_parts[:2]:
        shutil.copy2(part, local / "nights" / part.name)
    (local / "nights" / "README.txt").write_text("not an input")
    (local / "elsewhere.h5ad").write_bytes(b"outside the prefix")
    upload_tree(local, f"{s3_bucket}/incoming", s3_env)

    prefix = f"{s3_bucket}/incoming/nights/"
    found = list_sources([prefix])
    assert [s.name for s in found] == [f"{s3_bucket}/incoming/nights/{p.name}" for p in atlas_parts[:2]]
    assert all(
        s.fingerprint.startswith("etag:") and s.size == p.stat().st_size
        for s, p in zip(found, atlas_parts, strict=False)
    )

    cfg = make_config(tmp_path, inputs=[prefix])
    result = rebuild(cfg)
    assert result.status == "published" and result.new_inputs == 2, result
    store = ZarrStore(cfg.store)
    assert store.n_obs == sum(api.open_counts(p).n_obs for p in atlas_parts[:2])
    assert [r["name"] for r in store.metadata[LEDGER]] == [s.name for s in found]
    assert not (tmp_path / "runs" / "work" / "a0001" / "downloads").exists()  # the copies are removed
    api.load_run(result.path)
    assert rebuild(cfg).status == "nothing"
