"""TileDB-SOMA experiments (the CELLxGENE Census layout) as conversion inputs: :func:`open_soma`, :class:`SomaInput`.

An experiment is a TileDB group with ``obs`` (cells) and ``ms/<measurement>`` holding ``var`` (genes) and
``X/<layer>`` (a sparse cells x genes array indexed by the ``soma_joinid`` of ``obs`` and ``var``). It is
read like the other inputs (:mod:`scvi_scale.store.inputs`): ``obs`` and the gene names in memory, the counts
through tiledbsoma's sparse reader in row blocks of about ``max_entries`` entries, never whole.

Choices, each overridable:

- measurement ``"RNA"`` (Census and ``tiledbsoma.io.from_anndata`` both use it), or ``EXPERIMENT#NAME``;
- layer ``"raw"`` (Census), else ``"counts"``, else the only layer there is; ``--layer`` names another
  (``from_anndata`` writes AnnData's ``X`` as ``"data"`` and each of ``layers`` under its own name);
- gene names: ``feature_name`` (Census symbols), else the column AnnData's var index became (``var_id``);
  with ``var_names="gene_ids"``, ``feature_id`` (Census Ensembl IDs), else ``gene_ids``, else that index column;
- cell names: the column AnnData's obs index became (``obs_id``), else the ``soma_joinid`` as text.

The scan pass reads every entry once (the largest count, and each row's entry count, 4 bytes a cell, so
that blocks can be cut at row boundaries to size); the block pass reads row ranges by ``soma_joinid``, with
tiledbsoma's result buffers and TileDB's tile memory sized from the block (``soma.init_buffer_bytes``,
``sm.mem.total_budget``) so that one block is held at a time.
``s3://`` experiments use the TileDB store's S3 settings (:func:`~scvi_scale.store.tiledb_store.tiledb_config`:
``AWS_ENDPOINT_URL``, ``AWS_*`` keys and region).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.store.errors import InputError
from scvi_scale.store.inputs import CountInput, row_cuts
from scvi_scale.store.validate import check_var_names

__all__ = ["DEFAULT_LAYERS", "DEFAULT_MEASUREMENT", "SomaInput", "is_soma", "open_soma", "split_measurement"]

DEFAULT_MEASUREMENT = "RNA"
DEFAULT_LAYERS = ("raw", "counts")  # Census calls its raw counts "raw"; many AnnData files call them "counts"
_SYMBOL_COLUMNS = ("feature_name", "gene_symbols")
_ID_COLUMNS = ("feature_id", "gene_ids")
_JOINID = "soma_joinid"
_INDEX_META = "soma_dataframe_original_index_name"  # where from_anndata records the index column's name
_HINT = "pip install 'scvi-scale[soma]'"
_CUT_WINDOW = 1 << 20  # rows whose entry offsets are held at a time when cutting blocks: 8 MB
_MIN_BUFFER = 1 << 20
_MIN_TILE_BUDGET = 16 << 20


def _soma() -> Any:
    try:
        import tiledbsoma
    except ImportError as exc:
        raise InputError(f"reading TileDB-SOMA experiments needs tiledbsoma ({exc}); install it: {_HINT}") from exc
    return tiledbsoma


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def split_measurement(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """``EXPERIMENT#MEASUREMENT`` -> (experiment, measurement); a path without ``#``, or that exists: (path, None)."""
    text = os.fspath(path)
    base, sep, name = text.rpartition("#")
    if not sep or not base or not name or "/" in name or (not _is_url(text) and Path(text).exists()):
        return text, None
    return base, name


def is_soma(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is for this reader: a URL (object storage holds no other input kind), or a local TileDB
    group (a folder with ``__tiledb_group.tdb``), with or without a ``#MEASUREMENT`` suffix."""
    text, _ = split_measurement(path)
    if _is_url(text):
        return True
    return (Path(text.removeprefix("file://")) / "__tiledb_group.tdb").is_file()


def _index_column(frame: Any, columns: list[str], fallback: str) -> str | None:
    """The column a SOMA DataFrame's original pandas index became: from its metadata, else ``fallback``."""
    try:
        named = json.loads(frame.metadata.get(_INDEX_META, "null"))
    except (TypeError, ValueError):
        named = None
    for name in (named, fallback):
        if isinstance(name, str) and name in columns:
            return name
    return None


def _read_frame(frame: Any, columns: list[str] | None = None) -> pd.DataFrame:
    """A whole SOMA DataFrame (or ``columns`` of it, plus ``soma_joinid``) in ``soma_joinid`` order."""
    names = None if columns is None else [_JOINID, *columns]
    df = frame.read(column_names=names).concat().to_pandas()
    return df.sort_values(_JOINID, kind="stable").reset_index(drop=True)


def _positions(joinids: np.ndarray, wanted: np.ndarray, what: str, source: str) -> np.ndarray:
    """Positions in the sorted ``joinids`` of ``wanted`` (X coordinates); an entry off the frame is an error."""
    if joinids.shape[0] and joinids[-1] - joinids[0] == joinids.shape[0] - 1:  # 0..n-1 as written: no search
        pos = wanted - joinids[0]
        bad = (pos < 0) | (pos >= joinids.shape[0])
    else:
        pos = np.searchsorted(joinids, wanted)
        bad = pos >= joinids.shape[0]
        bad[~bad] = joinids[pos[~bad]] != wanted[~bad]
    if bad.any():
        raise InputError(
            f"{source}: X has an entry at {what} soma_joinid {int(wanted[np.argmax(bad)])}, which is not in "
            f"{what}; the experiment is inconsistent, so rewrite it"
        )
    return pos


class SomaInput(CountInput):
    """One measurement's X layer of a TileDB-SOMA experiment, read in row blocks (see the module docstring)."""

    kind = "tiledb-soma"

    def __init__(
        self,
        uri: str,
        key: str,
        x_uri: str,
        config: dict[str, str],
        var_names: np.ndarray,
        obs: pd.DataFrame,
        obs_ids: np.ndarray,
        var_ids: np.ndarray,
        nnz: int,
        max_entries: int,
    ) -> None:
        super().__init__(Path(uri.removeprefix("file://")), key, var_names, obs, nnz, max_entries)
        self.uri, self._x_uri, self._config = uri, x_uri, config
        self._obs_ids, self._var_ids = obs_ids, var_ids  # sorted soma_joinids of the rows and the columns
        self._row_nnz: np.ndarray | None = None  # entries per row, from the scan

    @property
    def source(self) -> str:
        return self.uri

    def _open_x(self) -> Any:
        """X opened for one pass, with memory sized from the block: tiledbsoma's result buffers hold a quarter block
        (8 bytes an entry and column), and TileDB's own tile memory is capped too (left at its default, a read of the
        whole array for the scan held 200 MB of tiles for 12M entries; capped, 20 MB and no slower)."""
        tiledbsoma = _soma()
        sizes = {
            "soma.init_buffer_bytes": str(max(_MIN_BUFFER, 2 * self.max_entries)),
            "sm.mem.total_budget": str(max(_MIN_TILE_BUDGET, 8 * self.max_entries)),
        }
        ctx = tiledbsoma.SOMATileDBContext(tiledb_config={**self._config, **sizes})
        return tiledbsoma.SparseNDArray.open(self._x_uri, context=ctx)

    def _entries(self, x: Any, coords: tuple = ()) -> Iterator[tuple[np.ndarray, ...]]:
        """(row positions, column positions, values) of the entries at ``coords``, a buffer at a time."""
        for table in x.read(coords=coords).tables():
            rows = _positions(self._obs_ids, table.column("soma_dim_0").to_numpy(), "obs", self.source)
            cols = _positions(self._var_ids, table.column("soma_dim_1").to_numpy(), "var", self.source)
            yield rows, cols, table.column("soma_data").to_numpy()

    def scan(self, progress: Callable[[int], object] = lambda n: None) -> float:
        row_nnz = np.zeros(self.n_obs, dtype=np.uint32)
        best = 0.0
        with self._open_x() as x:
            for rows, _, values in self._entries(x):
                hit, count = np.unique(rows, return_counts=True)
                row_nnz[hit] += count.astype(np.uint32)
                if values.size:
                    best = max(best, float(np.nanmax(values)))
                progress(values.size)
        self._row_nnz = row_nnz
        self.nnz = int(row_nnz.sum(dtype=np.int64))  # exact now; until the scan, an upper bound (_entry_bound)
        return best

    def _coords(self, start: int, stop: int) -> tuple:
        ids = self._obs_ids
        if ids[-1] - ids[0] == ids.shape[0] - 1:
            return (slice(int(ids[start]), int(ids[stop - 1])),)  # SOMA slices include both ends
        return (ids[start:stop],)

    def blocks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        if self._row_nnz is None:
            self.scan()
        row_nnz, n_vars = self._row_nnz, len(self.var_names)
        with self._open_x() as x:
            for w0 in range(0, self.n_obs, _CUT_WINDOW):
                counts = row_nnz[w0 : w0 + _CUT_WINDOW]
                ptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
                for a, b in row_cuts(ptr, self.max_entries):
                    yield w0 + a, w0 + b, self._read_block(x, w0 + a, w0 + b, int(ptr[b] - ptr[a]), n_vars)

    def _read_block(self, x: Any, start: int, stop: int, nnz: int, n_vars: int) -> sp.csr_matrix:
        """Rows ``start:stop`` (``nnz`` entries, as the scan counted) as CSR, filled into arrays allocated once.

        Entries are read in TileDB's own order ("auto"; "row-major" made TileDB sort them: 13x slower, 200 MB more
        for a 3.6M-entry block). Where that comes sorted by row, as for a single fragment, the column and value
        arrays become the CSR's own (12 bytes an entry at the peak); otherwise scipy sorts them.
        """
        rows, cols, values, at = np.empty(nnz, np.int32), np.empty(nnz, np.int32), None, 0
        for r, c, v in self._entries(x, self._coords(start, stop)):
            if at + v.size > nnz:
                at = -1  # more than the scan counted
                break
            if values is None:
                values = np.empty(nnz, dtype=v.dtype)
            rows[at : at + v.size], cols[at : at + v.size], values[at : at + v.size] = r - start, c, v
            at += v.size
        if at != nnz:
            raise InputError(
                f"{self.source}: X rows {start}:{stop} no longer hold the {nnz} entries the scan counted; the "
                "experiment changed while being read, so convert again"
            )
        values = np.zeros(0, dtype=np.float32) if values is None else values
        shape = (stop - start, n_vars)
        if nnz and np.any(rows[1:] < rows[:-1]):  # fragments interleave: COO -> CSR sorts them
            return sp.coo_matrix((values, (rows, cols)), shape=shape).tocsr()
        indptr = np.zeros(stop - start + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=stop - start), out=indptr[1:])
        return sp.csr_matrix((values, cols, indptr), shape=shape)

    def provenance(self) -> dict[str, Any]:
        if _is_url(self.uri):
            return {"path": self.uri, "kind": self.kind, "key": self.key, "size_bytes": None, "mtime": None}
        return {**super().provenance(), "path": str(self.path.resolve())}


def _entry_bound(x: Any) -> int:
    """Stored entries of ``x`` or more: the fragments' cell count (overwritten cells count twice), read from
    fragment metadata. ``x.nnz`` is exact, but where fragments overlap (as ``from_anndata`` writes them) it reads
    every coordinate at once (200 MB for 12M entries); the scan counts the entries exactly instead."""
    try:
        return int(x._handle.fragment_cell_count())  # what tiledbsoma's own CSR reader sizes buffers with
    except Exception:  # a tiledbsoma without it: the exact count, bought with memory
        return int(x.nnz)


def _choose_layer(names: list[str], layer: str | None, source: str, measurement: str) -> str:
    if layer is not None:
        if layer not in names:
            raise InputError(
                f"{source}: measurement '{measurement}' has no X layer '{layer}'; its layers: {names or 'none'}; "
                "pass --layer with one of them"
            )
        return layer
    found = [n for n in DEFAULT_LAYERS if n in names]
    if found:
        return found[0]
    if len(names) == 1:
        return names[0]
    raise InputError(
        f"{source}: measurement '{measurement}' has no X layer named {' or '.join(DEFAULT_LAYERS)} and "
        f"{len(names)} others ({names}); pass --layer with the one holding raw counts"
    )


def _gene_column(columns: list[str], index_col: str | None, var_names: str, source: str, measurement: str) -> str:
    preferred = _ID_COLUMNS if var_names == "gene_ids" else _SYMBOL_COLUMNS
    for name in (*preferred, index_col):
        if name is not None and name in columns:
            return name
    raise InputError(
        f"{source}: measurement '{measurement}' var has none of the columns {list(preferred)} and no index "
        f"column for gene names; its columns: {columns}"
    )


def open_soma(
    path: str | os.PathLike[str],
    *,
    max_entries: int,
    layer: str | None = None,
    var_names: str = "gene_symbols",
    measurement: str | None = None,
    config: dict[str, str] | None = None,
) -> SomaInput:
    """Open a TileDB-SOMA experiment (local folder or ``s3://`` URL) for streaming.

    Parameters
    ----------
    path
        The experiment; ``EXPERIMENT#MEASUREMENT`` picks the measurement when ``measurement`` is not given.
    max_entries
        Stored entries per row block.
    layer
        The X layer (default: ``raw``, else ``counts``, else the only one).
    var_names
        ``"gene_symbols"`` or ``"gene_ids"``: which var column names the genes (see the module docstring).
    measurement
        Default ``"RNA"``.
    config
        Extra TileDB config entries (on top of the S3 settings for ``s3://``).
    """
    from scvi_scale.store.open import describe_open_error, secret_values
    from scvi_scale.store.tiledb_store import tiledb_config

    uri, named = split_measurement(path)
    measurement = measurement or named or DEFAULT_MEASUREMENT
    tiledbsoma = _soma()
    cfg = tiledb_config(uri, config)
    location = uri if _is_url(uri) else str(Path(uri.removeprefix("file://")).resolve())
    try:
        exp = tiledbsoma.open(location, context=tiledbsoma.SOMATileDBContext(tiledb_config=cfg))
    except Exception as exc:  # missing, unreachable or not SOMA: one line, secrets scrubbed
        what = "TileDB-SOMA experiment" + (" (URLs are read only as TileDB-SOMA experiments)" if _is_url(uri) else "")
        raise InputError(describe_open_error(uri, exc, what, secret_values(cfg))) from exc
    with exp:
        if exp.soma_type != "SOMAExperiment":
            inside = f" holding {sorted(exp.keys())}" if hasattr(exp, "keys") else ""
            raise InputError(
                f"{uri}: a {exp.soma_type}{inside}, not a SOMAExperiment; pass the experiment itself "
                "(in the Census: census_data/<organism>)"
            )
        measurements = sorted(exp.ms.keys()) if "ms" in exp else []
        if measurement not in measurements:
            raise InputError(
                f"{uri}: no measurement '{measurement}'; its measurements: {measurements or 'none'}; "
                "name one as EXPERIMENT#MEASUREMENT"
            )
        ms = exp.ms[measurement]
        layers = sorted(ms.X.keys()) if "X" in ms else []
        chosen = _choose_layer(layers, layer, uri, measurement)
        x = ms.X[chosen]
        if x.soma_type != "SOMASparseNDArray":
            raise InputError(f"{uri}: X layer '{chosen}' is a {x.soma_type}; only sparse layers are read")
        key = f"ms/{measurement}/X/{chosen}"

        var_cols = [c for c in ms.var.schema.names if c != _JOINID]
        gene_col = _gene_column(var_cols, _index_column(ms.var, var_cols, "var_id"), var_names, uri, measurement)
        var = _read_frame(ms.var, [gene_col])
        genes = check_var_names(var[gene_col].astype(str).to_numpy(), f"{uri} ({measurement} var '{gene_col}')")

        obs = _read_frame(exp.obs)
        obs_ids = obs.pop(_JOINID).to_numpy(dtype=np.int64)
        index_col = _index_column(exp.obs, list(obs.columns), "obs_id")
        names = obs.pop(index_col).astype(str) if index_col else pd.Series(obs_ids).astype(str)
        obs.index = pd.Index(names.to_numpy(), name=None)
        if obs.shape[0] == 0:
            raise InputError(f"{uri}: obs has no cells")
        nnz, x_uri = _entry_bound(x), x.uri
    return SomaInput(uri, key, x_uri, cfg, genes, obs, obs_ids, var[_JOINID].to_numpy(dtype=np.int64), nnz, max_entries)
