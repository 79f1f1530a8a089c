"""Out-of-core preparation of a count store with dask: per-gene statistics, seurat_v3 highly variable genes
(batch-aware, as scanpy's ``batch_key``), per-batch library-size priors and batch codes, recorded in the store.

- :func:`~scvi_scale.prep.prepare.prepare`: the whole preparation (``scvi-scale prepare``).
- :mod:`~scvi_scale.prep.seurat_v3`: the seurat_v3 arithmetic on per-gene sums.
"""
