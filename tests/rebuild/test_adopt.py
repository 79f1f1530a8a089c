"""A store converted by hand before the first rebuild: its inputs, files and 10x folders alike, are recognised
as ingested (by the store's provenance), so the rebuild never appends them a second time."""

from __future__ import annotations

from pathlib import Path

import anndata
import pandas as pd
import scipy.sparse as sp

from scvi_scale.rebuild.run import _ingested, _raw_meta
from scvi_scale.rebuild.sources import _walk_local
from scvi_scale.store.convert import convert
from tests.tenx import counts, write_mtx


def test_hand_converted_inputs_are_adopted(tmp_path: Path) -> None:
    inputs = tmp_path / "incoming"
    genes = [f"g{j}" for j in range(15)]
    x = counts(40, 15, 0)
    folder = write_mtx(inputs / "s1", x, [f"id{j}" for j in range(15)], genes, [f"s1-{i}" for i in range(40)])
    h5ad = inputs / "s2.h5ad"
    adata = anndata.AnnData(sp.csr_matrix(counts(25, 15, 1).astype("float32")))
    adata.obs_names, adata.var = [f"s2-{i}" for i in range(25)], pd.DataFrame(index=genes)
    adata.write_h5ad(h5ad)
    convert([folder, h5ad], tmp_path / "atlas.zarr", batch_per_file=True, progress=False)
    sources = _walk_local(inputs)
    assert len(sources) == 2
    done = _ingested(_raw_meta(str(tmp_path / "atlas.zarr")), sources)
    assert {s.id for s in sources} == set(done)  # both, the folder (whose size is its three files) included
