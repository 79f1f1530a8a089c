"""Opening a count store by path or URL: the backend (Zarr, TileDB, in-memory ``.h5ad``) from the name, and for
object-store URLs the client (obstore or fsspec) with its endpoint and credentials, which are never printed."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from scvi_scale.store.errors import InputError

__all__ = ["S3Settings", "describe_open_error", "open_store", "open_zarr_group", "resolve_location", "s3_settings"]

logger = logging.getLogger(__name__)

_S3_HINT = "install the s3 extra: pip install 'scvi-scale[s3]'"
_S3_SCHEMES = ("s3", "s3a")
_GS_SCHEMES = ("gs", "gcs")
# Options both clients understand (translated for each); any other key is an fsspec option and selects fsspec.
_COMMON_OPTIONS = frozenset({"endpoint_url", "key", "secret", "token", "region", "anon"})
_BACKENDS = ("auto", "obstore", "fsspec")
_SENSITIVE = ("secret", "token", "key", "password", "credential")
_ENDPOINT = "the endpoint (AWS_ENDPOINT_URL or storage_options endpoint_url)"
_KEYS = "the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage_options key/secret)"
_GS_KEYS = "the credentials (GOOGLE_APPLICATION_CREDENTIALS or storage_options token)"
_CHECK = {  # what to check, by scheme and by kind of failure
    "s3": {
        "missing": f"the bucket and path in the URL, and {_ENDPOINT}",
        "denied": f"{_KEYS} and the region (AWS_REGION or storage_options region)",
        "other": f"{_ENDPOINT}, the region (AWS_REGION or storage_options region), {_KEYS} and the network",
    },
    "gs": {
        "missing": "the bucket and path in the URL",
        "denied": _GS_KEYS,
        "other": f"{_GS_KEYS} and the network",
    },
}


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to reach S3: ``storage_options`` on top of the usual AWS environment variables.

    The repr leaves out the key, secret and session token.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


def s3_settings(storage_options: Mapping[str, Any] | None = None) -> S3Settings:
    """Resolve the S3 endpoint, region and credentials.

    ``storage_options`` keys ``endpoint_url``, ``region``, ``anon``, ``key``, ``secret`` and ``token`` win over
    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``/``S3_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION`` and
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``. A key from the options never pairs
    with a secret from the environment. Unset fields are left to the client's own lookup (profiles, instance roles).
    """
    opts, env = dict(storage_options or {}), os.environ
    endpoint = opts.get("endpoint_url") or next(
        (env[v] for v in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL") if env.get(v)), None
    )
    region = opts.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    if opts.get("key") or opts.get("secret"):
        key, secret, token = opts.get("key"), opts.get("secret"), opts.get("token")
    elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        key, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        token = opts.get("token") or env.get("AWS_SESSION_TOKEN") or None
    else:
        key = secret = token = None
    return S3Settings(endpoint, region, bool(opts.get("anon", False)), key, secret, token)


def secret_values(*sources: Mapping[str, Any] | S3Settings | None) -> list[str]:
    """Values to scrub from messages: credentials of ``S3Settings`` and entries of mappings named like secrets."""
    found: list[str] = []
    for src in sources:
        if isinstance(src, S3Settings):
            found += [v for v in (src.key, src.secret, src.token) if v]
        elif src:
            found += [str(v) for k, v in src.items() if any(s in str(k).lower() for s in _SENSITIVE) and v]
    return [v for v in found if len(v) >= 4]  # shorter values would redact ordinary words


def _redact(text: str, secrets: Iterable[str]) -> str:
    for value in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The gist of a client error: its first line, cut before TileDB's request ids and headers."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split("[Remote IP", 1)[0].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scheme(text: str) -> str:
    scheme = text.split("://", 1)[0].lower() if "://" in text else "file"
    return "s3" if scheme in _S3_SCHEMES else "gs" if scheme in _GS_SCHEMES else scheme


def describe_open_error(source: str, exc: BaseException, what: str, secrets: Iterable[str] = ()) -> str:
    """A one-line message for a failure to open ``source`` (a path or URL): what went wrong and what to check.

    Secrets in ``secrets`` are replaced by ``***`` (client errors do not echo credentials, but make sure).
    """
    scheme = _scheme(source)
    detail = _redact(f"{type(exc).__name__}: {_first_line(exc)}", secrets)
    if scheme == "file":
        return f"{source}: cannot open as a {what} ({detail})"
    check = _CHECK.get(scheme, dict.fromkeys(("missing", "denied", "other"), "the URL and the storage_options"))
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc)
    if names & {"FileNotFoundError", "NodeNotFoundError", "NotFoundError"} or "NoSuchBucket" in text:
        return f"{source}: no {what} found there; check {check['missing']}"
    if names & {"PermissionError", "PermissionDeniedError", "UnauthenticatedError"} or "AccessDenied" in text:
        return f"{source}: access denied ({detail}); check {check['denied']}"
    return f"{source}: cannot open the {what} ({detail}); check {check['other']}"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _choose_backend(scheme: str, opts: dict[str, Any], s3: S3Settings | None) -> str:
    """obstore (faster here, per env-notes) unless fsspec-only options are given or fsspec is asked for.

    obstore does not look up a bucket's region: with neither a region nor a custom endpoint configured, s3fs
    (which does) is preferred when installed.
    """
    requested = str(opts.pop("backend", "auto"))
    if requested not in _BACKENDS:
        raise InputError(f"storage_options backend must be one of {list(_BACKENDS)}, got {requested!r}")
    fs_module = {"s3": "s3fs", "gs": "gcsfs"}.get(scheme)
    extra = sorted(set(opts) - _COMMON_OPTIONS)
    has_obstore, has_fs = _has("obstore"), fs_module is None or _has(fs_module)
    if requested == "obstore":
        if extra:
            raise InputError(
                f"storage_options {extra} are fsspec options; obstore takes only {sorted(_COMMON_OPTIONS)}"
            )
        return "obstore" if has_obstore else "missing"
    if requested == "fsspec":
        return "fsspec" if has_fs else "missing"
    region_known = s3 is None or bool(s3.region or s3.endpoint_url)
    if has_obstore and not extra and (region_known or not has_fs):
        return "obstore"
    return "fsspec" if has_fs else "missing"


def _obstore_store(scheme: str, text: str, opts: dict[str, Any], s3: S3Settings | None) -> Any:
    from obstore.store import GCSStore, S3Store

    parsed = urlparse(text)
    bucket, prefix = parsed.netloc, parsed.path.strip("/") or None
    if scheme == "s3":
        assert s3 is not None
        config: dict[str, Any] = {}
        if s3.endpoint_url:
            config["endpoint"] = s3.endpoint_url
        if s3.region:
            config["region"] = s3.region
        if s3.anon:
            config["skip_signature"] = True
        elif s3.key and s3.secret:
            config.update(access_key_id=s3.key, secret_access_key=s3.secret)
            if s3.token:
                config["session_token"] = s3.token
        http = bool(s3.endpoint_url and s3.endpoint_url.startswith("http://"))
        return S3Store(bucket, prefix=prefix, config=config, client_options={"allow_http": True} if http else None)
    config = {"skip_signature": True} if opts.get("anon") else {}
    if opts.get("token"):
        config["service_account_path"] = str(opts["token"])
    return GCSStore(bucket, prefix=prefix, config=config)


def _fsspec_options(scheme: str, opts: dict[str, Any], s3: S3Settings | None) -> dict[str, Any]:
    if scheme == "s3":
        assert s3 is not None
        out = {k: v for k, v in opts.items() if k not in _COMMON_OPTIONS}
        if s3.endpoint_url:
            out["endpoint_url"] = s3.endpoint_url
        if s3.anon:
            out["anon"] = True
        elif s3.key and s3.secret:
            out.update(key=s3.key, secret=s3.secret, **({"token": s3.token} if s3.token else {}))
        if s3.region:
            out["client_kwargs"] = {"region_name": s3.region, **out.get("client_kwargs", {})}
        return out
    if scheme == "gs" and opts.get("anon"):
        return {**{k: v for k, v in opts.items() if k != "anon"}, "token": "anon"}
    return opts


def resolve_location(
    path_or_url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, read_only: bool = True
) -> tuple[Any, str]:
    """What ``zarr.open_group`` should open for a path or URL, and the name to use in messages.

    Plain paths and ``file://`` URLs stay local paths. ``s3://`` and ``gs://`` URLs become a zarr ``ObjectStore``
    (obstore) or, when obstore is missing, fsspec-only options are given or ``storage_options["backend"]`` is
    ``"fsspec"``, an ``FsspecStore``; other URLs go to fsspec with ``storage_options`` as they are. For S3 see
    :func:`s3_settings` for the options and environment variables. Credentials never appear in messages or logs.
    """
    text = os.fspath(path_or_url)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" not in text:
        return text, text
    scheme, opts = _scheme(text), dict(storage_options or {})
    s3 = s3_settings(opts) if scheme == "s3" else None
    secrets = secret_values(opts, s3)
    backend = _choose_backend(scheme, opts, s3) if scheme in ("s3", "gs") else "fsspec"
    if backend == "missing":
        raise InputError(f"{text}: reading {scheme}:// URLs needs obstore or {scheme}fs; {_S3_HINT}")
    try:
        if backend == "obstore":
            from zarr.storage import ObjectStore

            store: Any = ObjectStore(_obstore_store(scheme, text, opts, s3), read_only=read_only)
        else:
            from zarr.storage import FsspecStore

            fs_opts = _fsspec_options(scheme, opts, s3)
            store = FsspecStore.from_url(text, storage_options=fs_opts, read_only=read_only)
    except ImportError as exc:
        raise InputError(f"{text}: no filesystem for '{scheme}://' is installed ({exc}); {_S3_HINT}") from exc
    except Exception as exc:  # a bad option or configuration: one line, secrets scrubbed
        raise InputError(describe_open_error(text, exc, "object store client", secrets)) from exc
    endpoint = urlparse(s3.endpoint_url).hostname if s3 and s3.endpoint_url else "default"
    logger.debug("opened %s with %s (endpoint %s)", text, backend, endpoint)
    return store, text


def open_zarr_group(
    path_or_url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *, mode: str = "r"
) -> tuple[Any, str]:
    """Open the Zarr group at a path or URL (``mode`` "r" or "r+"); return it and the name to use in messages.

    Raises
    ------
    InputError
        No store at a local path, or any failure to open, in one line naming what to check (secrets scrubbed).
    """
    import zarr

    location, source = resolve_location(path_or_url, storage_options, read_only=mode == "r")
    if isinstance(location, str) and not Path(location).exists():
        raise InputError(f"{source}: no such store; check the path or run `scvi-scale convert` first")
    try:
        return zarr.open_group(location, mode=mode), source
    except Exception as exc:  # any zarr/obstore/fsspec failure to open becomes one line
        s3 = s3_settings(storage_options) if _scheme(source) == "s3" else None
        raise InputError(describe_open_error(source, exc, "Zarr store", secret_values(storage_options, s3))) from exc


def _kind(text: str) -> str | None:
    name = text.rstrip("/").lower()
    for suffix, kind in ((".zarr", "zarr"), (".h5ad", "h5ad"), (".tiledb", "tiledb")):
        if name.endswith(suffix):
            return kind
    if "://" not in text and (Path(text) / "zarr.json").is_file():
        return "zarr"  # a Zarr v3 store whose directory is not named *.zarr
    return None


def _open_tiledb(uri: str, storage_options: Mapping[str, Any] | None) -> Any:
    try:
        from scvi_scale.store.tiledb_store import TileDBStore
    except ImportError as exc:
        raise InputError(
            f"{uri}: TileDB stores need the tiledb package ({exc}); install the tiledb extra: "
            "pip install 'scvi-scale[tiledb]'"
        ) from exc
    return TileDBStore(uri, storage_options=storage_options)


def open_store(
    path_or_url: str | os.PathLike[str],
    *,
    layer: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    drop_empty_cells: bool = False,
) -> Any:
    """Open a count store for reading.

    Parameters
    ----------
    path_or_url
        ``*.zarr`` (a local directory, ``file://`` or object-store URL such as ``s3://bucket/atlas.zarr``):
        a :class:`~scvi_scale.store.zarr_store.ZarrStore`; ``*.h5ad``: read whole into a
        :class:`~scvi_scale.store.memory.MemoryStore`; ``*.tiledb`` (local or ``s3://``): a ``TileDBStore``
        (needs the tiledb extra).
    layer
        For ``.h5ad`` only: the layer holding raw counts.
    storage_options
        Object-store options (the config entry): ``endpoint_url``, ``region``, ``key``, ``secret``, ``token``,
        ``anon`` and ``backend`` (``"auto"``, ``"obstore"`` or ``"fsspec"``); other keys are passed to fsspec.
        Unset, ``s3://`` takes its endpoint, region and keys from the ``AWS_*`` variables (:func:`s3_settings`).
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
        return _open_tiledb(text, storage_options)
    raise InputError(
        f"{text}: unknown kind of store; expected a *.zarr store, an *.h5ad file or a *.tiledb array "
        "(convert .h5ad files with `scvi-scale convert`)"
    )
