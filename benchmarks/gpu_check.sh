#!/usr/bin/env bash
# One prepared end-to-end GPU check: build a >= 1M-cell synthetic Zarr store on local disk (streamed, never whole
# in memory), train scVI on one GPU from it (`scvi-scale train --device cuda`, batch >= 1024), and report the
# steady-state cells/s (from metrics.csv) and GPU busy % (nvidia-smi every 0.5 s during training) against the
# target of 250k cells/s on one H100 (../shared/reference/loaders.md, section 14).
#
# Usage (from anywhere; the repository is this script's parent folder):
#   bash benchmarks/gpu_check.sh                 # the check: 1,000,000 cells x 2,000 genes, 3 epochs, batch 4096
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps at a tiny size on CPU (CI smoke test)
#   options: --cells N --genes N --epochs N --batch-size N --loader-threads N --workdir DIR
#   environment: PYTHON (interpreter to use), OUT (folder for the JSON summary, metrics.csv, GPU samples, logs)
#
# Python: $PYTHON if set, else the first of .venv/bin/python, .venv-gpu/bin/python and python3 that imports
# scvi_scale's stack and (except in the dry run) sees a GPU (torch.cuda.is_available()). If none does, it
# creates .venv-gpu and runs `pip install torch==2.13.0 -e .` (PyPI's torch 2.13.0 for Linux x86_64 is the CUDA
# build); that needs network access and is skipped, with a message, when it fails.
#
# Steps: 0. the interpreter; 1. the store (cached in the work folder by size: a second run skips the build);
# 2. the loader alone (StoreLoader -> device, no model) at 1/4/8/16 reader threads and 4x larger blocks, 10 s each;
# 3. training; 4. the summary. Time (H100 budget ~8 minutes): each step runs under `timeout`: install 180 s
# (only when no interpreter fits), build 120 s, loader 90 s, training 210 s: ~7 minutes without the install.
# A training run cut by its timeout still reports the epochs it finished (metrics.csv grows per epoch).
#
# Prints progress on stderr and the JSON summary on stdout (and in $OUT/gpu_check.json).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CELLS=1000000
GENES=2000
EPOCHS=3
BATCH=4096
LOADER_THREADS=8
TARGET=250000
DRY=0
WORKDIR="${TMPDIR:-/tmp}/scvi_scale_gpu_check"
INSTALL_TIMEOUT=180
BUILD_TIMEOUT=120
LOADER_TIMEOUT=90
TRAIN_TIMEOUT=210

say() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

user_set=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --cells) CELLS="$2"; user_set+=(cells); shift ;;
    --genes) GENES="$2"; user_set+=(genes); shift ;;
    --epochs) EPOCHS="$2"; user_set+=(epochs); shift ;;
    --batch-size) BATCH="$2"; user_set+=(batch); shift ;;
    --loader-threads) LOADER_THREADS="$2"; user_set+=(threads); shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

is_set() { [[ " ${user_set[*]-} " == *" $1 "* ]]; }
DEVICE=cuda
if [[ $DRY -eq 1 ]]; then  # tiny sizes unless given; CPU, one reader thread, one torch thread
  DEVICE=cpu
  is_set cells || CELLS=4096
  is_set genes || GENES=200
  is_set epochs || EPOCHS=2
  is_set batch || BATCH=512
  is_set threads || LOADER_THREADS=1
  BUILD_TIMEOUT=120
  LOADER_TIMEOUT=60
  TRAIN_TIMEOUT=180
elif [[ $BATCH -lt 1024 ]]; then
  die "--batch-size must be >= 1024 for the GPU check (got $BATCH)"
fi
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
OUT_DIR="${OUT:-}"
[[ -n $OUT_DIR ]] && mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SAMPLER_PID=""
cleanup() { if [[ -n $SAMPLER_PID ]]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

# -- 0. a Python with scvi_scale's stack (and a CUDA torch for the real check) ---------------------------------------
STACK='import torch, numpy, scipy, pandas, zarr, numcodecs, anndata, yaml, tqdm; import scvi_scale.api'
works() {  # works PYTHON -> exit 0 when it imports the stack (and, for the GPU check, sees a GPU)
  [[ -x $1 ]] || command -v "$1" >/dev/null 2>&1 || return 1
  "$1" -c "$STACK" >/dev/null 2>&1 || return 1
  [[ $DRY -eq 1 ]] || "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
PY=""
if [[ -n ${PYTHON:-} ]]; then
  works "$PYTHON" || die "PYTHON=$PYTHON does not import scvi_scale's stack$([[ $DRY -eq 1 ]] || echo ' or sees no GPU')"
  PY="$PYTHON"
else
  for cand in "$ROOT/.venv/bin/python" "$ROOT/.venv-gpu/bin/python" python3; do
    if works "$cand"; then PY="$cand"; break; fi
  done
fi
INSTALL_S=0
if [[ -z $PY ]]; then
  [[ $DRY -eq 0 ]] || die "no Python here imports scvi_scale's stack; create .venv first"
  say "no interpreter with a CUDA torch and the stack; creating $ROOT/.venv-gpu (pip install torch==2.13.0 -e .)"
  t0=$SECONDS
  python3 -m venv "$ROOT/.venv-gpu" || die "python3 -m venv failed"
  # --ignore-requires-python: pyproject pins <3.12 only to keep CPU machines off PyPI's CUDA torch
  if ! timeout "$INSTALL_TIMEOUT" "$ROOT/.venv-gpu/bin/python" -m pip install --quiet --ignore-requires-python \
      torch==2.13.0 -e "$ROOT" >&2; then
    die "pip install failed or timed out (no network access?); set PYTHON to an interpreter with a CUDA torch 2.13"
  fi
  INSTALL_S=$((SECONDS - t0))
  PY="$ROOT/.venv-gpu/bin/python"
  works "$PY" || die "the new .venv-gpu does not see a GPU: torch.cuda.is_available() is False (CPU wheel or no driver)"
fi
CUDA_INFO="$("$PY" -c 'import json, torch; a = torch.cuda.is_available(); print(json.dumps({"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": a, "device_name": torch.cuda.get_device_name(0) if a else None}))')"
say "python: $PY; $CUDA_INFO"
GPU_INFO=""
if [[ $DRY -eq 0 ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found"
  GPU_INFO="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
  say "gpu: $GPU_INFO"
fi

# -- 1. the store: synthetic atlas streamed chunk by chunk (parallel generation, in-order append) -----------------------
STORE="$WORKDIR/synthetic_${CELLS}x${GENES}.zarr"
say "store: $STORE ($CELLS cells x $GENES genes)"
t0=$SECONDS
timeout "$BUILD_TIMEOUT" "$PY" - "$STORE" "$CELLS" "$GENES" > "$WORKDIR/build.json" <<'PYEOF' || die "store build failed or timed out after ${BUILD_TIMEOUT}s"
"""Write the synthetic atlas as a Zarr store without holding it: processes generate row chunks (same counts as
iter_chunks: the generator is deterministic per 1,024-row block), this process appends them in order."""
import json, os, shutil, sys, time
from multiprocessing import get_context

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.datasets.synthetic import BLOCK_ROWS, SyntheticSpec, draw_params, generate_rows
from scvi_scale.store.zarr_store import CsrAppender, ZarrStore, create_layout, set_complete, write_elem

path, n_cells, n_genes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = SyntheticSpec(n_cells=n_cells, n_genes=n_genes, n_batches=4, seed=0)
CHUNK = 16 * BLOCK_ROWS
_params = None


def init():
    global _params
    _params = draw_params(spec)


def rows(bounds):
    c = generate_rows(spec, bounds[0], bounds[1], _params)
    x = c.x_ng
    if x.nnz and float(x.data.max()) > np.iinfo(np.uint16).max:
        raise ValueError("a count exceeds uint16")
    x = sp.csr_matrix((x.data.astype(np.uint16), x.indices, x.indptr), shape=x.shape)
    b = {n: i for i, n in enumerate(spec.batch_names)}
    t = {n: i for i, n in enumerate(spec.cell_type_names)}
    return x, np.array([b[v] for v in c.batch], np.int8), np.array([t[v] for v in c.cell_type], np.int8)


t0 = time.perf_counter()
try:
    store = ZarrStore(path)
    cached = True
except Exception:
    cached = False
    tmp = path + ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    root = create_layout(tmp, spec.gene_names, np.dtype(np.uint16), {"genes": "synthetic", "batch_key": "batch"})
    writer = CsrAppender(root)
    bcodes, tcodes = [], []
    bounds = [(s, min(s + CHUNK, n_cells)) for s in range(0, n_cells, CHUNK)]
    with get_context("fork").Pool(max(1, min(os.cpu_count() or 1, 16) - 1), initializer=init) as pool:
        for x, bc, tc in pool.imap(rows, bounds):
            writer.append(x)
            bcodes.append(bc)
            tcodes.append(tc)
    writer.close()
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(np.concatenate(bcodes), categories=spec.batch_names),
            "cell_type": pd.Categorical.from_codes(np.concatenate(tcodes), categories=spec.cell_type_names),
        },
        index=pd.Index(spec.cell_names(0, n_cells)),
    )
    write_elem(root, "obs", obs)
    set_complete(root, True, provenance=[{"input": f"synthetic:{n_cells}x{n_genes}", "rows": [0, n_cells]}])
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    store = ZarrStore(path)
x_dir = os.path.join(path, "X")
disk = {}
for name in ("data", "indices", "indptr"):
    disk[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(x_dir, name)) for f in fs)
nnz = int(store.nnz)
print(json.dumps({
    "cached": cached, "build_s": time.perf_counter() - t0, "n_cells": int(store.n_obs), "n_genes": int(store.n_vars),
    "nnz_per_cell": nnz / store.n_obs, "disk_bytes_per_entry": (disk["data"] + disk["indices"]) / max(nnz, 1),
    "disk_bytes_per_cell": sum(disk.values()) / store.n_obs, "x_disk_bytes": sum(disk.values()),
}))
PYEOF
BUILD_WALL=$((SECONDS - t0))
say "store ready in ${BUILD_WALL}s: $(cat "$WORKDIR/build.json")"

# -- 2. the loader alone: cells/s per reader-thread count (and 4x larger blocks), minibatches on the device ---------
say "loader sweep (timeout ${LOADER_TIMEOUT}s)"
LOADER_JSON="$WORKDIR/loader.json"
timeout "$LOADER_TIMEOUT" "$PY" - "$STORE" "$BATCH" "$DEVICE" "$DRY" > "$LOADER_JSON" <<'PYEOF' || say "loader sweep failed or timed out (exit $?); its finished lines are kept"
"""StoreLoader without a model: what the data path alone delivers to the device (page cache warm: just written)."""
import json, sys, time

import torch

from scvi_scale.data.prefetch import StoreLoader, auto_block_size
from scvi_scale.store.zarr_store import ZarrStore

path, batch, device, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
cap_s = 4.0 if dry else 10.0  # seconds per configuration: a partial epoch is enough for a rate
store = ZarrStore(path)
codes, _ = store.batch_codes("batch")
if device == "cuda":
    torch.zeros(1, device=device)  # CUDA context outside the timings
auto = auto_block_size(store)
configs = [(1, auto), (2, auto)] if dry else [(1, auto), (4, auto), (8, auto), (16, auto), (8, 4 * auto)]
for threads, block in configs:
    loader = StoreLoader(store, codes, None, batch, seed=0, num_threads=threads, block_size=block, device=device)
    t0 = time.perf_counter()
    cells = 0
    for b in loader:
        cells += b.n_obs
        if time.perf_counter() - t0 > cap_s:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    t = loader.timings()
    print(json.dumps({"threads": threads, "block_size": block, "batch_size": batch, "cells": cells, "seconds": secs,
                      "cells_per_s": cells / secs, **{k: v / max(cells, 1) * 1e6 for k, v in t.items()}}), flush=True)
PYEOF

# -- 3. train, sampling GPU utilisation ---------------------------------------------------------------------------
RUN="$WORKDIR/run"
SAMPLES="$WORKDIR/gpu_util.csv"
: > "$SAMPLES"
if [[ $DRY -eq 0 ]]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$SAMPLES" 2>/dev/null &
  SAMPLER_PID=$!
fi
TRAIN_ARGS=(
  -m scvi_scale train "$STORE" --out "$RUN" --batch-key batch --epochs "$EPOCHS" --device "$DEVICE"
  --no-progress --overwrite --seed 0
  --set "data.batch_size=$BATCH" --set "data.loader_threads=$LOADER_THREADS"
  --set train.check_val_every_n_epoch=1000000000
)
[[ $DRY -eq 1 ]] && TRAIN_ARGS+=(--set train.num_threads=1)
say "train: $PY ${TRAIN_ARGS[*]} (timeout ${TRAIN_TIMEOUT}s)"
t0=$SECONDS
TRAIN_RC=0
timeout "$TRAIN_TIMEOUT" "$PY" "${TRAIN_ARGS[@]}" > "$WORKDIR/train.log" 2>&1 || TRAIN_RC=$?
TRAIN_WALL=$((SECONDS - t0))
cleanup
SAMPLER_PID=""
say "training ended after ${TRAIN_WALL}s with exit code $TRAIN_RC$([[ $TRAIN_RC -eq 124 ]] && echo ' (timeout: partial epochs)')"
[[ $TRAIN_RC -eq 0 ]] || tail -n 20 "$WORKDIR/train.log" >&2

# -- 4. summary ------------------------------------------------------------------------------------------------------
SUMMARY="$WORKDIR/gpu_check.json"
"$PY" - "$RUN/metrics.csv" "$SAMPLES" "$WORKDIR/build.json" "$TARGET" "$DRY" "$TRAIN_RC" "$TRAIN_WALL" \
    "$BUILD_WALL" "$INSTALL_S" "$BATCH" "$LOADER_THREADS" "$EPOCHS" "$DEVICE" "$PY" "$CUDA_INFO" "$GPU_INFO" "$LOADER_JSON" \
    > "$SUMMARY" <<'PYEOF'
import csv, datetime, json, os, platform, sys

(metrics, samples, build, target, dry, rc, train_wall, build_wall, install_s, batch, threads, epochs, device,
 py, cuda_info, gpu_info, loader_json) = sys.argv[1:]
target, dry = float(target), dry == "1"
rows = []
if os.path.exists(metrics):
    with open(metrics, newline="") as fh:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]
measured = list(range(1, len(rows))) if len(rows) >= 2 else list(range(len(rows)))
secs = sum(rows[i]["perf/epoch_s"] for i in measured)
cells = sum(rows[i]["perf/cells_per_s"] * rows[i]["perf/epoch_s"] for i in measured)
cps = cells / secs if secs > 0 else None

# GPU samples: "YYYY/MM/DD HH:MM:SS.fff, util, mem" every 0.5 s over the whole training process. "measured" is
# the last measured-epochs' seconds before the last busy sample (training ends with those epochs).
util = []
for line in open(samples):
    parts = [p.strip() for p in line.split(",")]
    try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        util.append((t, float(parts[1]), float(parts[2])))
    except (ValueError, IndexError):
        continue
def mean(xs):
    return sum(xs) / len(xs) if xs else None
busy = [s for s in util if s[1] > 0]
gpu = {"samples": len(util), "busy_pct_all": mean([s[1] for s in util])}
if busy:
    t_end = busy[-1][0]
    gpu["busy_pct_active"] = mean([s[1] for s in util if busy[0][0] <= s[0] <= t_end])
    gpu["busy_pct_measured"] = mean([s[1] for s in util if t_end - secs <= s[0] <= t_end])
    gpu["memory_used_mib_max"] = max(s[2] for s in util)

per_epoch = [{k.split("/", 1)[-1]: r.get(k) for k in ("epoch", "perf/cells_per_s", "perf/epoch_s", "perf/step_s",
              "perf/data_s", "perf/idle_s", "perf/read_s", "perf/decode_s", "perf/assemble_s", "perf/h2d_s")}
             for r in rows]
busy_pct = gpu.get("busy_pct_measured")
store = json.load(open(build))
loader = [json.loads(line) for line in open(loader_json) if line.startswith("{")] if os.path.exists(loader_json) else []
summary = {
    "check": "gpu_end_to_end_train",
    "dry_run": dry,
    "device": device,
    "python": py,
    "python_version": platform.python_version(),
    **json.loads(cuda_info),
    "gpu": gpu_info or None,
    "store": store,
    "batch_size": int(batch),
    "loader_threads": int(threads),
    "epochs_requested": int(epochs),
    "epochs_done": len(rows),
    "measured_epochs": measured,
    "train_returncode": int(rc),
    "train_timed_out": rc == "124",
    "train_wall_s": float(train_wall),
    "store_build_wall_s": float(build_wall),
    "install_s": float(install_s),
    "cells_per_s": cps,
    "per_epoch": per_epoch,
    "read_mb_per_s": cps * store["disk_bytes_per_cell"] / 1e6 if cps else None,
    "loader_only": loader,
    "loader_only_best_cells_per_s": max((r["cells_per_s"] for r in loader), default=None),
    "gpu_util": gpu,
    "gpu_util_note": "nvidia-smi utilization.gpu: share of time a kernel ran, not SM occupancy",
    "target_cells_per_s": target,
    "target_gpu_busy_pct": 90.0,
    "met_cells_per_s": None if dry or cps is None else cps >= target,
    "met_gpu_busy": None if dry or busy_pct is None else busy_pct >= 90.0,
}
print(json.dumps(summary, indent=1))
PYEOF
if [[ -n $OUT_DIR ]]; then
  cp "$SUMMARY" "$OUT_DIR/gpu_check.json"
  cp "$SAMPLES" "$OUT_DIR/gpu_util.csv"
  if [[ -f $LOADER_JSON ]]; then cp "$LOADER_JSON" "$OUT_DIR/loader.json"; fi
  tail -n 200 "$WORKDIR/train.log" > "$OUT_DIR/train.log.tail"
  if [[ -f $RUN/metrics.csv ]]; then cp "$RUN/metrics.csv" "$OUT_DIR/metrics.csv"; fi
  say "wrote $OUT_DIR/gpu_check.json"
fi
cat "$SUMMARY"
if [[ $TRAIN_RC -ne 0 && $TRAIN_RC -ne 124 ]]; then exit "$TRAIN_RC"; fi
