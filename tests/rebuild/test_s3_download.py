"""Downloads of object-storage inputs check each object's ETag against the listing: same-size replacements fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from scvi_scale.rebuild.sources import download, list_sources
from scvi_scale.store.errors import InputError
from tests.s3 import upload_tree


def _upload(tmp: Path, files: dict[str, bytes], url: str, endpoint: str) -> None:
    local = tmp / "upload"
    for name, content in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(content)
    upload_tree(local, url, endpoint)


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_file_replaced_by_same_size_object_fails(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    prefix = f"{s3_bucket}/incoming"
    _upload(tmp_path, {"night1.h5ad": b"a" * 1000}, prefix, s3_env)
    (source,) = list_sources([f"{prefix}/"])
    dest = tmp_path / "downloads"

    copy = download(source, dest / "first")  # unchanged: downloaded, then reused as it is
    assert copy.read_bytes() == b"a" * 1000
    assert download(source, dest / "first") == copy

    _upload(tmp_path, {"night1.h5ad": b"b" * 1000}, prefix, s3_env)  # same size, other content
    assert [s.size for s in list_sources([f"{prefix}/"])] == [source.size]
    with pytest.raises(InputError, match="replaced since the inputs were listed"):
        download(source, dest / "second")
    assert _left(dest / "second") == []  # nothing a later attempt could take for the input
    with pytest.raises(InputError, match="replaced since"):  # a copy kept from before the change is not reused
        download(source, dest / "first")
    assert _left(dest / "first") == []
    (fresh,) = list_sources([f"{prefix}/"])
    assert fresh.fingerprint != source.fingerprint
    assert download(fresh, dest / "third").read_bytes() == b"b" * 1000


def test_folder_member_replaced_by_same_size_object_fails(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    prefix = f"{s3_bucket}/incoming"
    members = {"night.zarr/zarr.json": b'{"a": 1}', "night.zarr/X/c/0": b"0123456789"}
    _upload(tmp_path, members, prefix, s3_env)
    (source,) = list_sources([f"{prefix}/"])
    assert source.files == ("X/c/0", "zarr.json")

    _upload(tmp_path, {"night.zarr/X/c/0": b"9876543210"}, prefix, s3_env)
    with pytest.raises(InputError, match="replaced since"):
        download(source, tmp_path / "downloads")
    assert _left(tmp_path / "downloads") == []
