"""The 10x MatrixMarket reader: ``matrix.mtx(.gz)``, ``features.tsv(.gz)`` (or ``genes.tsv``), ``barcodes.tsv(.gz)``.

The matrix is genes x cells in coordinate format (1-based ``gene cell value`` lines after a ``%%MatrixMarket
matrix coordinate integer general`` header and a ``rows cols entries`` line). It is parsed with pandas in
chunks of lines, never whole. :meth:`MtxInput.scan` reads it once for the largest count, the entries per
cell (an ``indptr``, 8 bytes per cell) and whether the lines are sorted by cell, as CellRanger writes them.
:meth:`MtxInput.blocks` then reads it again: sorted entries become row blocks as they arrive; unsorted ones
are first spilled to one temporary file per row block (under ``TMPDIR``, 20 bytes per entry, removed as
each block is read) and each block is assembled from its file, so memory stays bounded either way.

GEO-style prefixed names (``GSM1_matrix.mtx.gz`` with ``GSM1_barcodes.tsv.gz``, ...) work when the matrix
file itself is given.
"""

from __future__ import annotations

import csv
import gzip
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.store.errors import InputError
from scvi_scale.store.inputs import CountInput, gene_columns, row_cuts

__all__ = ["MTX_NAMES", "MtxInput", "open_mtx"]

MTX_NAMES = ("matrix.mtx.gz", "matrix.mtx")
_FEATURE_NAMES = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
_BARCODE_NAMES = ("barcodes.tsv.gz", "barcodes.tsv")
_FOLDER_HINT = "a 10x folder holds matrix.mtx(.gz), features.tsv(.gz) (or genes.tsv) and barcodes.tsv(.gz)"
_MAX_CHUNK_LINES = 1 << 20  # bounds the parser's own buffers whatever the budget
_SPILL = np.dtype([("cell", "<i8"), ("gene", "<i4"), ("value", "<f8")])


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt") if path.name.lower().endswith(".gz") else open(path)  # noqa: SIM115


def _header(matrix: Path) -> tuple[int, int, int, int]:
    """(rows, cols, entries, lines before the first entry) from a MatrixMarket header."""
    try:
        with _open_text(matrix) as fh:
            first = fh.readline()
            parts = first.lower().split()
            if len(parts) != 5 or parts[0] != "%%matrixmarket" or parts[1] != "matrix":
                raise InputError(f"{matrix}: not a MatrixMarket file (first line {first.strip()[:60]!r})")
            if parts[2] != "coordinate" or parts[3] not in ("integer", "real", "double") or parts[4] != "general":
                raise InputError(
                    f"{matrix}: a MatrixMarket '{' '.join(parts[2:])}' matrix; counts must be 'coordinate integer "
                    "general' (10x's format)"
                )
            n_lines, line = 1, fh.readline()
            while line.startswith("%") or (line and not line.strip()):
                n_lines, line = n_lines + 1, fh.readline()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{matrix}: cannot read ({type(exc).__name__}: {exc}); the file is damaged") from exc
    try:
        n_rows, n_cols, nnz = (int(v) for v in line.split())
    except ValueError:
        raise InputError(
            f"{matrix}: line {n_lines + 1} should be 'genes cells entries', got {line.strip()!r}"
        ) from None
    return n_rows, n_cols, nnz, n_lines + 1


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    except (ValueError, OSError, EOFError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise InputError(f"{path}: cannot read as a tab-separated table ({type(exc).__name__}: {exc})") from exc


def _find(folder: Path, prefix: str, names: tuple[str, ...], matrix: Path) -> Path:
    for name in names:
        if (folder / f"{prefix}{name}").is_file():
            return folder / f"{prefix}{name}"
    wanted = " or ".join(f"{prefix}{n}" for n in names)
    raise InputError(f"{folder}: no {wanted} next to {matrix.name}; {_FOLDER_HINT}")


class MtxInput(CountInput):
    """A 10x MatrixMarket folder; rows are cells (barcodes), columns the kept genes."""

    kind = "10x-mtx"

    def __init__(
        self, folder: Path, matrix: Path, var_names: np.ndarray, obs: pd.DataFrame, col_map: np.ndarray | None,
        shape: tuple[int, int, int, int], max_entries: int,
    ) -> None:  # fmt: skip
        n_features, _, nnz, self._header_lines = shape
        super().__init__(folder, matrix.name, var_names, obs, nnz, max_entries)
        self.matrix, self.n_features, self._col_map = matrix, n_features, col_map
        self._ptr: np.ndarray | None = None  # entries per cell, from scan()
        self._sorted = True

    @property
    def source(self) -> str:
        return str(self.matrix)

    @property
    def _chunk_lines(self) -> int:
        # from max_entries when read: the converter sets it once the writer's share of the budget is known
        return int(min(max(1024, self.max_entries // 2), _MAX_CHUNK_LINES))

    def provenance(self) -> dict:
        st = self.matrix.stat()
        return {**super().provenance(), "size_bytes": st.st_size, "mtime": st.st_mtime}

    def _changed(self) -> InputError:
        return InputError(f"{self.source}: the file changed while being read; rerun the conversion")

    def _entries(self, progress: Callable[[int], object]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(cell, gene, value) of the kept entries, chunk by chunk: 0-based, genes as columns of ``var_names``."""
        line, seen = self._header_lines, 0
        with _open_text(self.matrix) as fh:
            for _ in range(self._header_lines):
                fh.readline()
            reader = None
            while True:
                try:
                    if reader is None:
                        reader = pd.read_csv(
                            fh, sep=r"\s+", header=None, names=["gene", "cell", "value"], index_col=False,
                            dtype={"gene": np.int64, "cell": np.int64, "value": np.float64},
                            chunksize=self._chunk_lines,
                        )  # fmt: skip
                    chunk = next(reader, None)
                except pd.errors.EmptyDataError:  # no entry lines at all
                    chunk = None
                except (ValueError, OSError, EOFError) as exc:  # pandas' parser errors are ValueErrors
                    raise InputError(
                        f"{self.source}: cannot parse the entries after line {line} ({type(exc).__name__}: {exc}); "
                        "each line must be 'gene cell count' with integer indices"
                    ) from exc
                if chunk is None:
                    break
                gene, cell, value = (chunk[k].to_numpy() for k in ("gene", "cell", "value"))
                self._check_lines(gene, cell, value, line)
                line, seen = line + gene.size, seen + gene.size
                progress(gene.size)
                gene, cell = gene - 1, cell - 1
                if self._col_map is not None:
                    gene = self._col_map[gene]
                    keep = gene >= 0
                    gene, cell, value = gene[keep], cell[keep], value[keep]
                yield cell, gene, value
        if seen != self.nnz:
            raise InputError(
                f"{self.source}: the header announces {self.nnz} entries but the file holds {seen}; it is truncated "
                "or damaged"
            )

    def _check_lines(self, gene: np.ndarray, cell: np.ndarray, value: np.ndarray, line: int) -> None:
        bad = (gene < 1) | (gene > self.n_features) | (cell < 1) | (cell > self.n_obs)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(
                f"{self.source}: line {line + i + 1}: entry (gene {gene[i]}, cell {cell[i]}) lies outside the "
                f"{self.n_features} x {self.n_obs} matrix of the header"
            )
        if np.isnan(value).any():
            i = int(np.argmax(np.isnan(value)))
            raise InputError(
                f"{self.source}: line {line + i + 1} has no count (or NaN); each line is 'gene cell count'"
            )

    def scan(self, progress: Callable[[int], object] = lambda n: None) -> float:
        counts_n = np.zeros(self.n_obs, dtype=np.int64)
        best, last, ordered = 0.0, -1, True
        for cell, _, value in self._entries(progress):
            if value.size:
                best = max(best, float(value.max()))
                counts_n += np.bincount(cell, minlength=self.n_obs)
                ordered = ordered and int(cell[0]) >= last and bool((np.diff(cell) >= 0).all())
                last = int(cell[-1])
        self._ptr = np.zeros(self.n_obs + 1, dtype=np.int64)
        np.cumsum(counts_n, out=self._ptr[1:])
        self._sorted = ordered
        return best

    def _csr(self, start: int, stop: int, gene: np.ndarray, value: np.ndarray) -> sp.csr_matrix:
        """Rows ``start:stop`` from their entries, already in cell order."""
        indptr = self._ptr[start : stop + 1] - self._ptr[start]
        data = np.ascontiguousarray(value)
        return sp.csr_matrix(
            (data, np.ascontiguousarray(gene, dtype=np.int32), indptr), shape=(stop - start, len(self.var_names))
        )

    def blocks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        if self._ptr is None:
            self.scan()
        cuts = list(row_cuts(self._ptr, self.max_entries))
        return self._stream(cuts) if self._sorted else self._spilled(cuts)

    def _stream(self, cuts: list[tuple[int, int]]) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Entries sorted by cell: each block is the next ``ptr[stop] - ptr[start]`` entries."""
        entries = self._entries(lambda n: None)
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        n_pending = 0
        for start, stop in cuts:
            need = int(self._ptr[stop] - self._ptr[start])
            while n_pending < need:
                chunk = next(entries, None)
                if chunk is None:
                    raise self._changed()
                pending.append(chunk)
                n_pending += chunk[0].size
            if need == 0:
                yield start, stop, self._csr(start, stop, np.zeros(0, np.int32), np.zeros(0))
                continue
            cell, gene, value = (np.concatenate([p[k] for p in pending]) for k in range(3))
            if cell[need - 1] >= stop or cell[0] < start:
                raise self._changed()
            yield start, stop, self._csr(start, stop, gene[:need], value[:need])
            pending, n_pending = [(cell[need:], gene[need:], value[need:])], n_pending - need
        entries.close()

    def _spilled(self, cuts: list[tuple[int, int]]) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Unsorted entries: spill each to its row block's file, then read the files back one at a time."""
        starts = np.asarray([a for a, _ in cuts], dtype=np.int64)
        tmp = Path(tempfile.mkdtemp(prefix="scvi-scale-mtx-"))
        try:
            for cell, gene, value in self._entries(lambda n: None):
                bucket = np.searchsorted(starts, cell, side="right") - 1
                order = np.argsort(bucket, kind="stable")
                rec = np.empty(cell.size, dtype=_SPILL)
                rec["cell"], rec["gene"], rec["value"] = cell[order], gene[order], value[order]
                bucket = bucket[order]
                edges = np.flatnonzero(np.diff(bucket)) + 1
                for lo, hi in zip(np.r_[0, edges], np.r_[edges, rec.size], strict=True):
                    if hi > lo:
                        with open(tmp / f"{bucket[lo]}.bin", "ab") as f:
                            rec[lo:hi].tofile(f)
            for i, (start, stop) in enumerate(cuts):
                part = tmp / f"{i}.bin"
                rec = np.fromfile(part, dtype=_SPILL) if part.exists() else np.zeros(0, dtype=_SPILL)
                part.unlink(missing_ok=True)
                if rec.size != self._ptr[stop] - self._ptr[start]:
                    raise self._changed()
                rec = rec[np.argsort(rec["cell"], kind="stable")]
                yield start, stop, self._csr(start, stop, rec["gene"], rec["value"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def open_mtx(folder: Path, matrix: Path | None, var_names: str, max_entries: int) -> MtxInput:
    """Open a 10x folder (``matrix`` None: ``folder/matrix.mtx(.gz)``) or a (possibly prefixed) matrix file."""
    if matrix is None:
        matrix, prefix = next(folder / m for m in MTX_NAMES if (folder / m).is_file()), ""
    else:
        prefix = matrix.name[: matrix.name.lower().rfind("matrix.mtx")]
    features = _find(folder, prefix, _FEATURE_NAMES, matrix)
    barcodes = _find(folder, prefix, _BARCODE_NAMES, matrix)
    shape = _header(matrix)
    n_features, n_cells = shape[0], shape[1]
    table = _read_tsv(features)
    if table.shape[0] != n_features:
        raise InputError(f"{features}: {table.shape[0]} features, but {matrix.name} has {n_features} rows")
    names = table[1].to_numpy() if table.shape[1] > 1 else None
    types = table[2].to_numpy() if table.shape[1] > 2 else None
    genes, col_map = gene_columns(table[0].to_numpy(), names, types, str(features), var_names)
    cells = _read_tsv(barcodes)[0].to_numpy()
    if cells.shape[0] != n_cells:
        raise InputError(f"{barcodes}: {cells.shape[0]} barcodes, but {matrix.name} has {n_cells} columns (cells)")
    if n_cells == 0:
        raise InputError(f"{matrix}: the matrix has no cells")
    obs = pd.DataFrame(index=pd.Index(cells.astype(str)))
    return MtxInput(folder, matrix, genes, obs, col_map, shape, max_entries)
