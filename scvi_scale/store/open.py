"""Opening a count store by path or URL: picks the backend (Zarr, TileDB, in-memory ``.h5ad``) from the name."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from scvi_scale.store.errors import InputError

__all__ = ["open_store", "resolve_location"]

logger = logging.getLogger(__name__)

_S3_HINT = "install the s3 extra: pip install 'scvi-scale[s3]'"


def _s3_options_from_env() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    return opts


def resolve_location(
    path_or_url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, read_only: bool = True
) -> tuple[Any, str]:
    """What ``zarr.open_group`` should open for a path or URL, and the name to use in messages.

    Plain paths and ``file://`` URLs stay local paths. Other URLs become a zarr ``FsspecStore``; for
    ``s3://`` the endpoint and keys come from ``AWS_ENDPOINT_URL``/``S3_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` unless ``storage_options`` sets them. Credentials
    never appear in messages or logs.
    """
    text = os.fspath(path_or_url)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" not in text:
        return text, text
    scheme = text.split("://", 1)[0].lower()
    opts = dict(storage_options or {})
    if scheme in ("s3", "s3a"):
        if importlib.util.find_spec("s3fs") is None:
            raise InputError(f"{text}: reading s3:// URLs needs s3fs; {_S3_HINT}")
        opts = {**_s3_options_from_env(), **opts}
    from zarr.storage import FsspecStore

    try:
        store = FsspecStore.from_url(text, storage_options=opts, read_only=read_only)
    except ImportError as exc:
        raise InputError(f"{text}: no filesystem for '{scheme}://' is installed ({exc}); {_S3_HINT}") from exc
    logger.debug("opened %s (endpoint %s)", text, opts.get("endpoint_url", "default"))
    return store, text


def _kind(text: str) -> str | None:
    name = text.rstrip("/").lower()
    for suffix, kind in ((".zarr", "zarr"), (".h5ad", "h5ad"), (".tiledb", "tiledb")):
        if name.endswith(suffix):
            return kind
    if "://" not in text and (Path(text) / "zarr.json").is_file():
        return "zarr"  # a Zarr v3 store whose directory is not named *.zarr
    return None


def _open_tiledb(uri: str) -> Any:
    try:
        from scvi_scale.store.tiledb_store import TileDBStore
    except ImportError as exc:
        raise InputError(
            f"{uri}: TileDB stores need the tiledb package ({exc}); install the tiledb extra: "
            "pip install 'scvi-scale[tiledb]'"
        ) from exc
    return TileDBStore(uri)


def open_store(
    path_or_url: str | os.PathLike[str],
    *,
    layer: str | None = None,
    storage_options: dict[str, Any] | None = None,
    drop_empty_cells: bool = False,
) -> Any:
    """Open a count store for reading.

    Parameters
    ----------
    path_or_url
        ``*.zarr`` (a local directory, ``file://`` or object-store URL such as ``s3://bucket/atlas.zarr``):
        a :class:`~scvi_scale.store.zarr_store.ZarrStore`; ``*.h5ad``: read whole into a
        :class:`~scvi_scale.store.memory.MemoryStore`; ``*.tiledb``: a ``TileDBStore`` (needs the tiledb extra).
    layer
        For ``.h5ad`` only: the layer holding raw counts.
    storage_options
        fsspec options for Zarr URLs; by default ``s3://`` takes its endpoint and keys from ``AWS_ENDPOINT_URL``
        (or ``S3_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.
    drop_empty_cells
        For ``.h5ad`` only: drop cells with no counts instead of raising.

    Raises
    ------
    InputError
        Unknown kind of store, a missing optional backend (naming the extra to install), or any error the
        backend raises when opening.
    """
    text = os.fspath(path_or_url)
    kind = _kind(text)
    if kind == "zarr":
        from scvi_scale.store.zarr_store import ZarrStore

        return ZarrStore(text, storage_options=storage_options)
    if kind == "h5ad":
        if "://" in text and not text.startswith("file://"):
            raise InputError(f"{text}: .h5ad files are read from local disk; download it or convert it to Zarr")
        from scvi_scale.store.h5ad import read_h5ad

        return read_h5ad(text.removeprefix("file://"), layer=layer, drop_empty_cells=drop_empty_cells)
    if kind == "tiledb":
        return _open_tiledb(text)
    raise InputError(
        f"{text}: unknown kind of store; expected a *.zarr store, an *.h5ad file or a *.tiledb array "
        "(convert .h5ad files with `scvi-scale convert`)"
    )
