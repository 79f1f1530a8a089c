"""Writers of small 10x Genomics inputs for tests: ``matrix.mtx`` folders and CellRanger ``.h5`` files."""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp


def counts(n_cells: int, n_genes: int, seed: int) -> np.ndarray:
    """Poisson counts (cells x genes, int64) with no empty cell."""
    x = np.random.default_rng(seed).poisson(1.0, (n_cells, n_genes))
    x[:, 0] += 1
    return x


def write_mtx(
    folder: Path,
    x_cg: np.ndarray,
    ids: list[str],
    names: list[str],
    barcodes: list[str],
    *,
    gz: bool = True,
    shuffle: bool = False,
    types: list[str] | None = None,
    genes_tsv: bool = False,
    prefix: str = "",
) -> Path:
    """A 10x folder: ``matrix.mtx`` (genes x cells, 1-based; sorted by cell unless ``shuffle``), features, barcodes.

    Values are written with ``%g``, so float arrays can plant non-integer or negative counts.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    cell, gene = np.nonzero(x_cg)  # row-major: sorted by cell, as CellRanger writes
    if shuffle:
        order = np.random.default_rng(0).permutation(cell.size)
        cell, gene = cell[order], gene[order]
    lines = [
        "%%MatrixMarket matrix coordinate integer general\n",
        '%metadata_json: {"software_version": "test"}\n',
        f"{x_cg.shape[1]} {x_cg.shape[0]} {cell.size}\n",
        *(f"{g + 1} {c + 1} {x_cg[c, g]:g}\n" for c, g in zip(cell, gene, strict=True)),
    ]
    _write_text(folder / f"{prefix}matrix.mtx{ext}", "".join(lines))
    rows = [
        f"{i}\t{n}" + (f"\t{types[k]}" if types is not None else "")
        for k, (i, n) in enumerate(zip(ids, names, strict=True))
    ]
    _write_text(folder / f"{prefix}{'genes' if genes_tsv else 'features'}.tsv{ext}", "\n".join(rows) + "\n")
    _write_text(folder / f"{prefix}barcodes.tsv{ext}", "\n".join(barcodes) + "\n")
    return folder


def _write_text(path: Path, text: str) -> None:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def write_10x_h5(
    path: Path,
    x_cg: np.ndarray,
    ids: list[str],
    names: list[str],
    barcodes: list[str],
    *,
    types: list[str] | None = None,
    v2: bool = False,
) -> Path:
    """A CellRanger ``.h5``: v3 (``/matrix`` with ``features/``) or v2 (``/GRCh38`` with ``genes``/``gene_names``)."""
    csr = sp.csr_matrix(x_cg)  # CSR cells x genes = the CSC genes x cells CellRanger stores
    with h5py.File(path, "w") as f:
        g = f.create_group("GRCh38" if v2 else "matrix")
        g["data"] = csr.data.astype(np.int32)
        g["indices"] = csr.indices.astype(np.int64)
        g["indptr"] = csr.indptr.astype(np.int64)
        g["shape"] = np.array([x_cg.shape[1], x_cg.shape[0]], dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        if v2:
            g["genes"] = np.array(ids, dtype="S")
            g["gene_names"] = np.array(names, dtype="S")
        else:
            feats = g.create_group("features")
            feats["id"] = np.array(ids, dtype="S")
            feats["name"] = np.array(names, dtype="S")
            feats["feature_type"] = np.array(types or ["Gene Expression"] * len(ids), dtype="S")
            feats["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")
            feats["_all_tag_keys"] = np.array([b"genome"])
    return path
