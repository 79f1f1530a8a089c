"""Count-store benchmarks: random row-block reads, conversion speed and memory, and the Zarr chunk size.

Prints JSON lines on stdout (see ``benchmarks/README.md``). Three parts, all on the built-in synthetic atlas
(``SyntheticSpec(n_cells, n_genes, n_batches=4, seed=0)``), all in one run:

``reads``
    Random blocks of ``--block`` consecutive rows at random offsets (the same offsets for every store),
    decoded to a scipy CSR: our ``ZarrStore.read_range``, our ``TileDBStore.read_range``, and the peers
    anndata backed ``.h5ad`` (``read_h5ad(backed="r").X[a:b]``) and ``anndata.io.sparse_dataset`` over our
    own Zarr store. The files were just written, so they sit in the page cache: this measures decode and
    assembly, not the disk. Ratios: zarr / h5ad-backed and tiledb / h5ad-backed.
``convert``
    ``scvi_scale.store.convert.convert`` of ``.h5ad`` inputs of growing size with a fixed ``--memory``
    budget, each in a fresh child process that reports its peak RSS, and its RSS before converting (Python
    plus the imports): the budget bounds ``peak - baseline``, which must not grow with the input. The peer is
    ``anndata.read_h5ad(path).write_zarr(out)`` (loads the whole matrix), measured the same way.
``chunks``
    The same Zarr store written with different ``X/data`` chunk sizes (entries per chunk), then random block
    reads of ``--block`` rows and of 128 rows: why ``ENTRY_CHUNK`` is 65,536.

Run ``python benchmarks/bench_store.py --help``; ``--quick`` is the size CI smoke-runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit, machine, peak_rss_bytes, ratio_line

from scvi_scale.datasets.synthetic import SyntheticSpec, write_h5ad

BENCH = "store"
N_BATCHES = 4
SEED = 0


def _block_starts(n_obs: int, block: int, n_reads: int) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.integers(0, max(1, n_obs - block), size=n_reads)


def _time_reads(read, starts: np.ndarray, block: int, repeats: int) -> dict[str, Any]:
    read(int(starts[0]), int(starts[0]) + block)  # warm-up: opens handles, reads indptr
    best, nnz = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        nnz = 0
        for s in starts:
            nnz += read(int(s), int(s) + block).nnz
        best = min(best, time.perf_counter() - t0)
    cells = len(starts) * block
    return {"cells_per_s": cells / best, "seconds": best, "cells": cells, "nnz_read": int(nnz)}


def bench_reads(h5ad: Path, zarr_path: Path, tiledb_path: Path | None, args: argparse.Namespace) -> None:
    import anndata
    import zarr

    from scvi_scale.store.zarr_store import ZarrStore

    zs = ZarrStore(zarr_path)
    starts = _block_starts(zs.n_obs, args.block, args.reads)
    readers: dict[str, Any] = {"zarr": zs.read_range}
    if tiledb_path is not None:
        from scvi_scale.store.tiledb_store import TileDBStore

        readers["tiledb"] = TileDBStore(tiledb_path).read_range
    backed = anndata.read_h5ad(h5ad, backed="r")
    readers["h5ad-backed"] = lambda a, b: backed.X[a:b]
    ds = anndata.io.sparse_dataset(zarr.open_group(zarr_path, mode="r")["X"])
    readers["anndata-sparse-dataset-on-our-zarr"] = lambda a, b: ds[a:b]
    results = {}
    for name, read in readers.items():
        rec = _time_reads(read, starts, args.block, args.repeats)
        results[name] = rec["cells_per_s"]
        emit({"bench": BENCH, "part": "reads", "store": name, "block": args.block, "n_obs": zs.n_obs, **rec})
    backed.file.close()
    for name in ("zarr", "tiledb"):
        if name in results:
            emit(ratio_line(BENCH, f"{name}/h5ad-backed", results[name], results["h5ad-backed"], None, part="reads"))


CHILD_CONVERT = """
import json, sys, time
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
mode, src, out, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import anndata, h5py, zarr
from scvi_scale.store.convert import convert
base = status("VmRSS")  # after the imports: what Python and the libraries cost before any data
t0 = time.perf_counter()
if mode == "ours":
    convert([src], out, batch_key="batch", memory_budget_bytes=budget, progress=False)
else:
    anndata.read_h5ad(src).write_zarr(out)
sec = time.perf_counter() - t0
print(json.dumps({"seconds": sec, "baseline_rss": base, "peak_rss": status("VmHWM")}))
"""


def _convert_child(mode: str, src: Path, out: Path, budget: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_CONVERT, mode, str(src), str(out), str(budget)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} conversion of {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _x_bytes(h5ad: Path) -> tuple[int, int]:
    """Cells and in-memory bytes of X as anndata holds it (data + indices + indptr)."""
    import h5py

    with h5py.File(h5ad, "r") as f:
        x = f["X"]
        n_obs = int(x.attrs["shape"][0])
        return n_obs, sum(int(x[k].size) * x[k].dtype.itemsize for k in ("data", "indices", "indptr"))


def bench_convert(inputs: list[Path], work: Path, args: argparse.Namespace) -> None:
    ours_peaks = []
    for src in inputs:
        n_obs, x_bytes = _x_bytes(src)
        row = {"bench": BENCH, "part": "convert", "n_obs": n_obs, "input_x_bytes": x_bytes, "budget": args.memory}
        for mode in ("ours", "anndata-read-write-zarr"):
            out = work / f"{src.stem}-{mode}.zarr"
            shutil.rmtree(out, ignore_errors=True)  # a rerun into the same --workdir measures afresh
            rec = _convert_child("ours" if mode == "ours" else "peer", src, out, args.memory)
            over = rec["peak_rss"] - rec["baseline_rss"]
            rec.update(
                impl=mode,
                cells_per_s=n_obs / rec["seconds"],
                peak_over_baseline=over,
                input_over_budget=x_bytes / args.memory,
                under_budget=bool(over <= args.memory),
            )
            if mode == "ours":
                ours_peaks.append(over)
            emit({**row, **rec})
    if len(ours_peaks) >= 2:
        growth = ours_peaks[-1] / max(ours_peaks[0], 1)
        emit({"bench": BENCH, "summary": "convert_peak_growth_largest/smallest", "ratio": growth, "target": None})


def bench_chunks(h5ad: Path, work: Path, args: argparse.Namespace) -> None:
    import scvi_scale.store.zarr_store as zarr_store
    from scvi_scale.store.convert import convert

    default = zarr_store.ENTRY_CHUNK
    for chunk in args.chunk_sweep:
        out = work / f"chunk{chunk}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        zarr_store.ENTRY_CHUNK = chunk  # create_layout reads the module constant when it builds X
        try:
            with contextlib.redirect_stdout(sys.stderr):
                convert([h5ad], out, batch_key="batch", progress=False)
        finally:
            zarr_store.ENTRY_CHUNK = default
        store = zarr_store.ZarrStore(out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        for block in (args.block, 128):
            starts = _block_starts(store.n_obs, block, args.reads)
            rec = _time_reads(store.read_range, starts, block, args.repeats)
            emit(
                {
                    "bench": BENCH,
                    "part": "chunks",
                    "entry_chunk": chunk,
                    "default": chunk == default,
                    "block": block,
                    "store_bytes": size,
                    **rec,
                }
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=100_000, help="cells of the read and chunk benchmarks")
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--block", type=int, default=1024, help="rows per random block read")
    p.add_argument("--reads", type=int, default=100, help="random blocks per measurement")
    p.add_argument("--repeats", type=int, default=3, help="best of this many passes over the blocks")
    p.add_argument(
        "--convert-sizes", default="25000,50000,100000,200000", help="cells of the conversion inputs, comma-separated"
    )
    p.add_argument("--memory", type=int, default=64 << 20, help="conversion memory budget in bytes")
    p.add_argument("--chunk-sweep", default="16384,65536,262144", help="X/data entries per chunk to compare")
    p.add_argument("--parts", default="reads,convert,chunks")
    p.add_argument("--workdir", type=Path, default=None, help="keep the generated files here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.n_cells, args.n_genes, args.reads, args.repeats = 3000, 200, 10, 1
        args.convert_sizes, args.memory, args.chunk_sweep = "1500,3000", 1 << 20, "16384,65536"
    args.convert_sizes = [int(s) for s in str(args.convert_sizes).split(",")]
    args.chunk_sweep = [int(s) for s in str(args.chunk_sweep).split(",")]
    args.parts = set(args.parts.split(","))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import tiledb  # noqa: F401  (imported early: a missing extra shows up in the header, not mid-run)

    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_store-")))
        work.mkdir(parents=True, exist_ok=True)
        emit({"bench": BENCH, "header": True, **machine(), "quick": args.quick, "args": _jsonable(vars(args))})

        def atlas(n: int) -> Path:
            path = work / f"atlas{n}x{args.n_genes}.h5ad"
            if not path.exists():
                with contextlib.redirect_stdout(sys.stderr):
                    write_h5ad(SyntheticSpec(n_cells=n, n_genes=args.n_genes, n_batches=N_BATCHES, seed=SEED), path)
            return path

        if "reads" in args.parts:
            from scvi_scale.store.convert import convert
            from scvi_scale.store.tiledb_store import TileDBStore

            src = atlas(args.n_cells)
            zpath, tpath = work / "reads.zarr", work / "reads.tiledb"
            if not zpath.exists():
                convert([src], zpath, batch_key="batch", progress=False)
            if not tpath.exists():
                import anndata

                TileDBStore.from_anndata(anndata.read_h5ad(src), tpath)
            bench_reads(src, zpath, tpath, args)
        if "convert" in args.parts:
            bench_convert([atlas(n) for n in args.convert_sizes], work, args)
        if "chunks" in args.parts:
            bench_chunks(atlas(args.n_cells), work, args)
        emit({"bench": BENCH, "done": True, "peak_rss_parent": peak_rss_bytes()})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v) for k, v in d.items()}


if __name__ == "__main__":
    main()
