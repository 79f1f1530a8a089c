"""Finding the rebuild's inputs (local files and folders, ``s3://`` or ``gs://`` prefixes), telling new ones from
ingested ones, and downloading object-storage inputs (streamed, a few MB in memory at a time).

An input is identified by its name (the resolved local path, or the URL of its object or folder) and fingerprinted
by size and modification time (local) or ETags (object storage), so a file that changes in place is noticed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from scvi_scale.store.errors import InputError

__all__ = ["Source", "download", "list_sources"]

logger = logging.getLogger(__name__)

_FILE_SUFFIXES = (".h5ad", ".h5")
_MTX = ("matrix.mtx", "matrix.mtx.gz")
_CHUNK = 8 << 20  # bytes held per download stream


@dataclass(frozen=True)
class Source:
    """One input: its name (path or URL), kind (file or folder), size and fingerprint; ``files`` for folders."""

    name: str
    size: int
    fingerprint: str  # mtime (local) or a digest of the ETags (object storage)
    files: tuple[str, ...] = ()  # object keys of a folder input (object storage), relative to the name

    @property
    def id(self) -> str:
        """A short stable id (sha1 of the name): file names and ledger keys."""
        return hashlib.sha1(self.name.encode()).hexdigest()[:16]

    @property
    def remote(self) -> bool:
        return "://" in self.name

    @property
    def basename(self) -> str:
        return self.name.rstrip("/").rsplit("/", 1)[-1]

    def record(self) -> dict[str, Any]:
        entry = asdict(self)
        entry.pop("files")
        return {"id": self.id, **entry}


def _is_input_dir(path: Path) -> bool:
    return (
        path.name.lower().endswith(".zarr")
        or (path / "zarr.json").is_file()
        or (path / ".zgroup").is_file()
        or any((path / m).is_file() for m in _MTX)
        or path.name.lower().endswith(".soma")
        or (path / "__tiledb_group.tdb").exists()  # a TileDB group: a TileDB-SOMA experiment
    )


def _local_source(path: Path) -> Source:
    if path.is_file():
        st = path.stat()
        return Source(str(path), st.st_size, f"mtime:{st.st_mtime_ns}")
    size, mtime = 0, path.stat().st_mtime_ns
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return Source(str(path), size, f"mtime:{mtime}")


def _walk_local(root: Path) -> list[Source]:
    """Inputs in a folder: files with an input suffix and input folders (taken whole); other folders searched."""
    found: list[Source] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):  # hidden: partial uploads, our own temporary names
            continue
        if entry.is_dir():
            found += [_local_source(entry)] if _is_input_dir(entry) else _walk_local(entry)
        elif entry.name.lower().endswith(_FILE_SUFFIXES):
            found.append(_local_source(entry))
    return found


def _object_store(url: str) -> Any:
    from scvi_scale.store.open import _obstore_store, _scheme, s3_settings  # one place resolves credentials

    scheme = _scheme(url)
    if scheme not in ("s3", "gs"):
        raise InputError(f"{url}: inputs in object storage must be s3:// or gs:// URLs")
    try:
        bucket_url = f"{url.split('://', 1)[0]}://{urlparse(url).netloc}"
        return _obstore_store(scheme, bucket_url, {}, s3_settings() if scheme == "s3" else None)
    except ImportError:
        raise InputError(
            f"{url}: reading inputs from object storage needs obstore: pip install 'scvi-scale[s3]'"
        ) from None


def _walk_remote(url: str) -> list[Source]:
    """Inputs under a prefix: ``.h5ad``/``.h5`` objects, and folders (``*.zarr/``, 10x ``matrix.mtx``) taken whole."""
    import obstore

    store = _object_store(url)
    scheme, bucket = url.split("://", 1)[0], urlparse(url).netloc
    prefix = urlparse(url).path.strip("/")
    try:
        objects = [o for batch in obstore.list(store, prefix=prefix or None) for o in batch]
    except Exception as exc:  # credentials, endpoint, missing bucket: one line naming the URL
        raise InputError(f"{url}: cannot list the inputs ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    roots: dict[str, list[dict]] = {}
    for obj in objects:
        key = str(obj["path"])
        if prefix and key != prefix and not key.startswith(prefix.rstrip("/") + "/"):
            continue
        parts = key.split("/")
        if any(p.startswith(".") for p in parts[len(prefix.split("/")) if prefix else 0 :]):
            continue
        zarr_at = next((i for i, p in enumerate(parts) if p.lower().endswith(".zarr")), None)
        if zarr_at is not None:
            root = "/".join(parts[: zarr_at + 1])
        elif parts[-1] in _MTX or parts[-1].startswith(("features.tsv", "genes.tsv", "barcodes.tsv")):
            root = "/".join(parts[:-1])
        elif key.lower().endswith(_FILE_SUFFIXES):
            root = key
        else:
            continue
        roots.setdefault(root, []).append(obj)
    found = []
    for root, objs in sorted(roots.items()):
        is_file = len(objs) == 1 and str(objs[0]["path"]) == root
        if (
            not is_file
            and not root.lower().endswith(".zarr")
            and not any(str(o["path"]).split("/")[-1] in _MTX for o in objs)
        ):
            continue  # barcodes or features without a matrix: not an input (yet)
        files = () if is_file else tuple(sorted(str(o["path"])[len(root) + 1 :] for o in objs))
        found.append(Source(f"{scheme}://{bucket}/{root}", sum(int(o["size"]) for o in objs), _etag_print(objs), files))
    return found


def _etag_print(objects: Iterable[Mapping[str, Any]]) -> str:
    """The fingerprint of an object-storage input: a digest of its objects' keys, ETags and sizes.

    ``objects`` are obstore ``ObjectMeta`` dicts, from a listing or from the GET (or HEAD) of each object: an
    object replaced by another, even of the same size, has another ETag and so changes the fingerprint.
    """
    tags = sorted(f"{o['path']}:{o.get('e_tag')}:{o['size']}" for o in objects)
    return "etag:" + hashlib.sha1("\n".join(tags).encode()).hexdigest()


def list_sources(inputs: tuple[str, ...] | list[str]) -> list[Source]:
    """Every input named by the config (files, folders searched, object-store prefixes listed), in a stable order."""
    found: list[Source] = []
    for item in inputs:
        if "://" in item and not item.startswith("file://"):
            if item.lower().endswith(_FILE_SUFFIXES):
                match = [s for s in _walk_remote(item) if s.name == item]
                if not match:
                    raise InputError(f"input {item}: no such object")
                found += match
            else:
                found += _walk_remote(item)
            continue
        path = Path(item.removeprefix("file://")).resolve()
        if not path.exists():
            raise InputError(f"input {item}: no such file or folder")
        if path.is_file() or _is_input_dir(path):
            found.append(_local_source(path))
        else:
            found += _walk_local(path)
    seen: set[str] = set()
    unique = [s for s in found if not (s.name in seen or seen.add(s.name))]
    return unique


def download(source: Source, dest_dir: Path) -> Path:
    """Copy an object-storage input into ``dest_dir/<basename>`` (streamed; a complete copy is kept).

    Files are written under a temporary name and renamed when complete, so a killed download is redone, and a
    finished one is reused when its size matches. The copy must be what was listed: the ETags (and sizes) of the
    objects fetched (HEAD for a copy reused) must give the listing's fingerprint, otherwise an object was replaced
    since, perhaps by one of the same size, and the copy is deleted and :class:`InputError` raised.
    """
    import obstore

    store = _object_store(source.name)
    key = urlparse(source.name).path.lstrip("/")
    target = dest_dir / source.basename
    members = [(key, target)] if not source.files else [(f"{key}/{f}", target / f) for f in source.files]
    fetched: list[Mapping[str, Any]] = []  # the ObjectMeta of each object as fetched
    for obj_key, path in members:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            if path.exists():  # renamed into place only when complete
                fetched.append(obstore.head(store, obj_key))
                continue
            result = obstore.get(store, obj_key)
            fetched.append(result.meta)
            with open(tmp, "wb") as out:
                for chunk in result.stream(min_chunk_size=_CHUNK):
                    out.write(chunk)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise InputError(f"{source.name}: download failed ({type(exc).__name__}: {exc})") from exc
        os.replace(tmp, path)
    got = sum(p.stat().st_size for _, p in members)
    problem = None
    if got != source.size:
        problem = f"downloaded {got} bytes, expected {source.size}; it changed meanwhile?"
    elif source.fingerprint.startswith("etag:") and _etag_print(fetched) != source.fingerprint:
        problem = "an object was replaced since the inputs were listed (its ETag differs); the next run lists it anew"
    if problem is not None:
        for _, path in members:  # not reused by a later attempt
            path.unlink(missing_ok=True)
        raise InputError(f"{source.name}: {problem}")
    logger.info("downloaded %s (%d bytes)", source.name, got)
    return target
