"""Built-in datasets: the synthetic ZINB atlas used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from scvi_scale.datasets.synthetic import (
    SyntheticChunk,
    SyntheticParams,
    SyntheticSpec,
    draw_params,
    generate_rows,
    iter_chunks,
    make_anndata,
    write_h5ad,
)

__all__ = [
    "SyntheticChunk",
    "SyntheticParams",
    "SyntheticSpec",
    "draw_params",
    "generate_rows",
    "iter_chunks",
    "make_anndata",
    "write_h5ad",
]
