"""Count stores: the ``CountStore`` contract, its backends, and count validation.

Public API
----------
- :class:`CountStore`: the protocol every backend satisfies (:mod:`scvi_scale.store.contract`).
- :class:`InputError`: one-line, user-facing error for bad files, layers, columns and counts.
- :func:`validate_counts`, :func:`check_count_block`, :func:`check_var_names`: the "counts are counts" checks.
- :class:`MemoryStore`: validated counts held in memory (tests, notebooks, small files).
- :func:`read_h5ad`: an ``.h5ad`` file as a :class:`MemoryStore`.
- :class:`ZarrStore`: a Zarr v3 store in the AnnData on-disk layout (local path or URL).
- :func:`open_store`: any store by path or URL (``.zarr``, ``.tiledb``, ``.h5ad``).
- :mod:`scvi_scale.store.convert` (``convert``, ``append``): stream ``.h5ad``, AnnData ``.zarr``, 10x ``.h5`` and
  10x ``matrix.mtx`` folders into a Zarr or TileDB store (local or URL) with bounded memory (not re-exported
  here: the function would shadow the module).
- ``TileDBStore`` lives in :mod:`scvi_scale.store.tiledb_store` (the ``tiledb`` extra).
"""

from __future__ import annotations

from scvi_scale.store.contract import CountStore
from scvi_scale.store.errors import InputError
from scvi_scale.store.h5ad import read_h5ad
from scvi_scale.store.memory import MemoryStore, category_codes, library_log_stats_from_totals
from scvi_scale.store.open import open_store
from scvi_scale.store.validate import ValidatedCounts, check_count_block, check_var_names, validate_counts
from scvi_scale.store.zarr_store import ZarrStore

__all__ = [
    "CountStore",
    "InputError",
    "MemoryStore",
    "ValidatedCounts",
    "ZarrStore",
    "open_store",
    "category_codes",
    "check_count_block",
    "check_var_names",
    "library_log_stats_from_totals",
    "read_h5ad",
    "validate_counts",
]
