"""The fixed held-out set: cells chosen by a hash of a stable cell id, so they stay held out as the atlas grows.

A cell is held out when ``blake2b(id) / 2**64 < holdout_fraction`` or its id is listed in the hold-out file.
Appends never move rows, so the held-out cells among the first ``n`` rows are the same on every later night;
the evaluation set is the ``max_eval_cells`` held-out cells with the lowest hashes, so the set a version was
evaluated on can be rebuilt exactly later (the gate compares a new model with the previous one on it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from scvi_scale.store.errors import InputError

__all__ = ["cell_hashes", "eval_data", "eval_rows", "heldout_rows"]


def cell_ids(store: Any, cell_id_key: str | None) -> np.ndarray:
    """The stable id of every cell: an obs column, or the obs names."""
    obs = store.obs
    if cell_id_key is None:
        return np.asarray(obs.index.astype(str))
    if cell_id_key not in obs.columns:
        raise InputError(f"{store.source}: no obs column '{cell_id_key}' (policy.cell_id_key)")
    return np.asarray(obs[cell_id_key].astype(str))


def cell_hashes(ids: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per id, the same on every machine and Python version."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, cid in enumerate(ids):
        out[i] = int.from_bytes(hashlib.blake2b(str(cid).encode(), digest_size=8).digest(), "little") / 2.0**64
    return out


def _listed(path: str | None) -> set[str]:
    if path is None:
        return set()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"policy.holdout_file {p} does not exist")
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def heldout_mask(
    store: Any, fraction: float, holdout_file: str | None, cell_id_key: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """(held out or not, hash) of every row of ``store``."""
    ids = cell_ids(store, cell_id_key)
    hashes = cell_hashes(ids)
    mask = hashes < fraction
    listed = _listed(holdout_file)
    if listed:
        mask |= np.isin(ids, list(listed))
    return mask, hashes


def heldout_rows(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int64)


def eval_rows(mask: np.ndarray, hashes: np.ndarray, n_obs: int, max_cells: int) -> np.ndarray:
    """The evaluation rows among the first ``n_obs``: held-out rows with the lowest hashes, in row order."""
    rows = np.flatnonzero(mask[:n_obs])
    if rows.size > max_cells:
        rows = rows[np.argsort(hashes[rows], kind="stable")[:max_cells]]
    return np.sort(rows).astype(np.int64)


def eval_data(store: Any, rows: np.ndarray) -> Any:
    """The rows as an in-memory AnnData (counts over all genes, obs): what evaluation reads."""
    import anndata
    import pandas as pd

    x = store.read_rows(rows)
    obs = store.obs.iloc[rows].copy()
    obs.index = obs.index.astype(str)
    return anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index([str(v) for v in store.var_names])))
