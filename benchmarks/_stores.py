"""Synthetic Zarr count stores of any size, streamed from the generator: the count matrix is never held whole.

:func:`build_synthetic_store` writes what ``scvi-scale convert`` of ``make_anndata(spec)`` would write (same
layout, uint16 counts, ``obs`` with categorical ``batch`` and ``cell_type`` indexed by cell name), but feeds
:func:`scvi_scale.datasets.synthetic.iter_chunks` straight into :class:`~scvi_scale.store.zarr_store.CsrAppender`,
so memory holds one generator chunk plus the appender's shard buffers (about 50 MB) and the obs columns (a
cell name and two one-byte codes per cell) whatever the number of cells. Stores are cached by their spec: a
complete store at the same path is reused, and a killed build leaves only a hidden ``.NAME.building`` folder,
removed by the next build.

Imported by plain name by the benchmark scripts (``python benchmarks/NAME.py`` puts this folder on the path).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scvi_scale.datasets.synthetic import SyntheticSpec, iter_chunks
from scvi_scale.store.errors import InputError
from scvi_scale.store.zarr_store import CsrAppender, ZarrStore, create_layout, set_complete, write_elem

__all__ = ["build_synthetic_store", "store_name"]

_UINT16_MAX = int(np.iinfo(np.uint16).max)


def store_name(spec: SyntheticSpec) -> str:
    """A file name that changes with everything that changes the counts."""
    return f"synthetic_{spec.n_cells}x{spec.n_genes}_b{spec.n_batches}_s{spec.seed}.zarr"


def _open_complete(path: Path) -> ZarrStore | None:
    if not path.exists():
        return None
    try:
        return ZarrStore(path)
    except InputError:  # incomplete or damaged: rebuild
        return None


def build_synthetic_store(spec: SyntheticSpec, workdir: str | os.PathLike[str]) -> tuple[ZarrStore, dict[str, Any]]:
    """The store for ``spec`` under ``workdir`` (built if missing) and facts about it.

    Returns
    -------
    tuple
        ``(store, info)``; ``info`` has ``path``, ``cached`` (reused), ``build_s``, ``disk_bytes``, ``nnz``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / store_name(spec)
    store = _open_complete(path)
    cached = store is not None
    t0 = time.perf_counter()
    if store is None:
        tmp = path.with_name(f".{path.name}.building")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        try:
            _write(spec, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, path)
        store = ZarrStore(path)
    info = {
        "path": str(path),
        "cached": cached,
        "build_s": None if cached else time.perf_counter() - t0,
        "disk_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        "nnz": store.nnz,
    }
    return store, info


def _write(spec: SyntheticSpec, location: Path) -> None:
    meta = {"genes": "synthetic", "batch_key": "batch", "provenance": []}
    root = create_layout(str(location), spec.gene_names, np.dtype(np.uint16), meta)
    writer = CsrAppender(root)
    batch_codes, type_codes = [], []
    batch_index = {name: i for i, name in enumerate(spec.batch_names)}
    type_index = {name: i for i, name in enumerate(spec.cell_type_names)}
    for chunk in iter_chunks(spec):
        x = chunk.x_ng
        if x.nnz and float(x.data.max()) > _UINT16_MAX:  # does not happen with the default knobs (max ~ 30k)
            raise ValueError(f"rows {chunk.start}..{chunk.stop}: a count exceeds uint16; use a smaller library_median")
        writer.append(x)
        batch_codes.append(np.fromiter((batch_index[b] for b in chunk.batch), np.int8, len(chunk.batch)))
        type_codes.append(np.fromiter((type_index[t] for t in chunk.cell_type), np.int8, len(chunk.cell_type)))
    writer.close()
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(np.concatenate(batch_codes), categories=spec.batch_names),
            "cell_type": pd.Categorical.from_codes(np.concatenate(type_codes), categories=spec.cell_type_names),
        },
        index=pd.Index(spec.cell_names(0, spec.n_cells)),
    )
    write_elem(root, "obs", obs)
    provenance = [{"input": f"synthetic:{store_name(spec)}", "rows": [0, spec.n_cells]}]
    set_complete(root, True, provenance=provenance)
