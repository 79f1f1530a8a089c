"""The model quality report: numbers, figures, ``report.md`` and ``report.json`` for one run (and its peer).

:func:`build_report` computes the numbers of :func:`scvi_scale.report.quality.compute_quality` (held-out
negative ELBO, marginal log-likelihood, integration scores), the per-stage timing summary of training
(``metrics.csv``'s ``perf/*`` columns), loss curves and a 2-D view coloured by batch and label. With
``side_by_side`` it trains scvi-tools' SCVI on the same data (:mod:`scvi_scale.report.peer`) and puts its numbers
beside ours (``peer/*`` keys, ``ratio/*`` = ours / peer). Every number the Markdown shows is in ``report.json``
under the same key.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scvi_scale.store.errors import InputError

__all__ = ["Report", "build_report", "timing_summary"]

_STAGES = ("epoch_s", "step_s", "data_s", "idle_s", "read_s", "decode_s", "assemble_s", "h2d_s")
# the rows of the comparison table: key, what it is, which direction is better
_HEADLINE = (
    ("heldout/neg_elbo", "held-out negative ELBO per cell", "lower"),
    ("heldout/reconstruction_loss", "held-out reconstruction loss", "lower"),
    ("heldout/kl_local", "held-out local KL divergence (z; and l when latent)", ""),
    ("marginal_ll", "marginal log-likelihood per cell (importance sampling)", "higher"),
    ("integration/total", "integration total (0.4 batch + 0.6 bio)", "higher"),
    ("integration/batch", "batch correction", "higher"),
    ("integration/bio", "bio conservation", "higher"),
)


@dataclass
class Report:
    """A built report: the numbers (``report.json``), the figures and where they were written."""

    out: Path | None
    numbers: dict[str, float]
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure
    files: dict[str, Path] = field(default_factory=dict)

    def __repr__(self) -> str:
        def show(key: str) -> str:
            v = self.numbers.get(key)
            return "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}"

        parts = [f"{k}={show(k)}" for k, _, _ in _HEADLINE[:1] + _HEADLINE[3:5] if k in self.numbers]
        if "peer/heldout/neg_elbo" in self.numbers:
            parts += [f"peer/{k}={show('peer/' + k)}" for k, _, _ in _HEADLINE[:1] + _HEADLINE[4:5]]
        where = f"{str(self.out)!r}, " if self.out is not None else ""
        return f"Report({where}{', '.join(parts)}, figures={sorted(self.figures)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "numbers": {k: _json_float(v) for k, v in self.numbers.items()},
            "notes": self.notes,
            "files": {k: p.name for k, p in self.files.items()},
        }


def _json_float(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def timing_summary(metrics: pd.DataFrame, prefix: str = "timing/") -> dict[str, float]:
    """Training time per stage from a run's ``metrics.csv``: totals and per-epoch means of the ``perf/*`` columns."""
    out: dict[str, float] = {}
    if metrics is None or not len(metrics):
        return out
    out[f"{prefix}epochs"] = float(len(metrics))
    for stage in _STAGES:
        col = f"perf/{stage}"
        if col in metrics.columns:
            v = pd.to_numeric(metrics[col], errors="coerce").to_numpy(dtype=float)
            if np.isfinite(v).any():
                out[f"{prefix}{stage}_total"] = float(np.nansum(v))
                out[f"{prefix}{stage}_per_epoch"] = float(np.nanmean(v))
    if "perf/cells_per_s" in metrics.columns:
        v = pd.to_numeric(metrics["perf/cells_per_s"], errors="coerce").to_numpy(dtype=float)
        if np.isfinite(v).any():
            out[f"{prefix}cells_per_s_median"] = float(np.nanmedian(v))
    return out


def build_report(
    run: Any,
    data: Any,
    out: str | Path | None,
    *,
    batch_key: str | None = None,
    labels_key: str | None = None,
    max_cells: int | None = 20_000,
    marginal_ll: bool = True,
    n_mc_samples: int = 100,
    max_ll_cells: int | None = 2_000,
    side_by_side: bool = False,
    epochs: int | None = None,
    peer_max_cells: int | None = None,
    seed: int = 0,
    view: str = "auto",
    use_scib: bool | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Report:
    """Build the quality report of a run on its data; writes ``out/report.md``, ``report.json`` and PNGs.

    Parameters
    ----------
    run
        A :class:`~scvi_scale.api.Run` or run directory.
    data
        The counts (path/URL, store or AnnData), usually the data the run was trained on.
    out
        The report directory (None: nothing written; the numbers and figures are returned).
    batch_key, labels_key
        obs columns for the integration metrics (batch default: the run's); no labels, no bio score.
    max_cells
        Integration metrics and the 2-D view on a seeded subsample of at most this many cells.
    marginal_ll, n_mc_samples, max_ll_cells
        The importance-sampled marginal log-likelihood, its samples per cell and its cell cap.
    side_by_side
        Also train scvi-tools' SCVI like the run (same data, architecture, split, seed; ``epochs`` or the run's
        epoch count) and report its numbers beside ours; the peer is kept in ``out/peer/``.
    view
        2-D view: ``"auto"`` (UMAP when installed, else PCA), ``"umap"`` or ``"pca"``.
    use_scib
        None: scib-metrics when installed (else our metrics, said so in the report); True/False to force.

    Examples
    --------
    >>> build_report("runs/a", "atlas.zarr", "runs/a/report", labels_key="cell_type")  # doctest: +SKIP
    Report('runs/a/report', heldout/neg_elbo=1012, marginal_ll=-1001, integration/total=0.612, figures=[...])
    """
    from scvi_scale import api
    from scvi_scale.report.quality import compute_quality

    run = api.load_run(run) if not isinstance(run, api.Run) else run
    out = Path(out) if out is not None else None
    if out is not None:
        if (out / "report.json").exists() and not overwrite:
            raise InputError(f"{out} already holds a report; choose another --out, or pass --overwrite")
        out.mkdir(parents=True, exist_ok=True)
    common = dict(batch_key=batch_key, labels_key=labels_key, marginal_ll=marginal_ll, n_mc_samples=n_mc_samples,
                  max_ll_cells=max_ll_cells, seed=seed, progress=progress, use_scib=use_scib)  # fmt: skip
    peer = peer_q = None
    peer_numbers: dict[str, float] = {}
    if side_by_side:
        # the peer trains first: after scib-metrics has run (jax, numba, OpenMP thread pools), torch training in
        # the same process was measured 8x slower on 2 cores, which would distort the peer's timings
        from scvi_scale.report.peer import PEER_MAX_CELLS, train_peer

        if out is None:
            raise InputError("side-by-side mode keeps the scvi-tools model in the report directory: pass out")
        cap = peer_max_cells or PEER_MAX_CELLS
        peer, peer_numbers = train_peer(run, data, out / "peer", epochs=epochs, max_cells=cap)
    t0 = time.perf_counter()
    ours = compute_quality(run, data, max_cells=max_cells, **common)
    numbers = dict(ours.numbers)
    numbers["timing/report_quality_s"] = time.perf_counter() - t0
    numbers.update(timing_summary(run.metrics))
    notes = list(ours.notes)
    if peer is not None:
        peer_q = compute_quality(peer, data, rows_n=ours.rows_n, x_pre_nd=ours.x_pre_nd, max_cells=max_cells, **common)
        numbers.update(peer_numbers)
        numbers.update({f"peer/{k}": v for k, v in peer_q.numbers.items()})
        numbers.update(timing_summary(peer.metrics, prefix="peer/timing/"))
        for key, _, _ in _HEADLINE:
            if key in ours.numbers and f"peer/{key}" in numbers:
                a, b = ours.numbers[key], numbers[f"peer/{key}"]
                numbers[f"ratio/{key}"] = a / b if b != 0.0 and math.isfinite(b) else math.nan
        notes.append(
            f"Peer: scvi-tools SCVI trained for {int(peer_numbers['peer/epochs'])} epochs on the same data, "
            "architecture, train/validation rows and seed; its numbers are computed by the same code on the same "
            "cells."
        )
    report = Report(out=out, numbers=numbers, notes=notes)
    _figures(report, run, ours, peer, peer_q, seed, view)
    if out is not None:
        _write(report, run, data, labels_key, ours.batch_key)
    return report


def _figures(report: Report, run: Any, ours: Any, peer: Any, peer_q: Any, seed: int, view: str) -> None:
    import matplotlib.pyplot as plt

    from scvi_scale.report.embed2d import embed_2d
    from scvi_scale.report.plots import plot_embedding, plot_loss_curves

    def save(name: str, fig: Any) -> None:
        report.figures[name] = fig
        if report.out is not None:
            path = report.out / f"{name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            report.files[name] = path
        plt.close(fig)  # kept as an object for notebooks, but not left open in pyplot's registry

    if len(run.metrics):
        save("loss_curves", plot_loss_curves(run.metrics, title="scvi-scale training"))
    if peer is not None and len(peer.metrics):
        save("peer_loss_curves", plot_loss_curves(peer.metrics, title="scvi-tools training (peer)"))
    for name, q, who in (("embedding", ours, "scvi-scale"), ("peer_embedding", peer_q, "scvi-tools (peer)")):
        if q is None:
            continue
        colors = {}
        if q.batch_n is not None:
            colors[f"batch ({q.batch_key})"] = q.batch_n
        if q.labels_n is not None:
            colors[f"label ({q.labels_key})"] = q.labels_n
        if not colors:
            colors["all cells"] = np.zeros(len(q.z_nk), dtype=int)
        coords, method = embed_2d(q.z_nk, seed=seed, method=view)
        save(name, plot_embedding(coords, colors, title=f"{who} latent space ({method}, {len(q.z_nk)} cells)"))


def _fmt(v: float | None) -> str:
    """How a number appears in the Markdown (the test reads it back against report.json)."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.6g}"


def _timing_table(n: dict[str, float], side: bool) -> list[str]:
    """Training time per stage (seconds, from ``metrics.csv``'s ``perf/*``), keyed as in ``report.json``."""
    keys = [k for k in n if k.startswith("timing/") and k != "timing/report_quality_s"]
    if not keys:
        return []
    lines = [
        "## Training time per stage",
        "",
        "From the run's `metrics.csv` (`perf/*`): `step` is forward/backward/optimizer, `data` waiting for "
        "minibatches, `read`/`decode`/`assemble`/`h2d` the loader's own stages (summed over its threads).",
        "",
    ]
    if side:
        lines += ["| key | scvi-scale | scvi-tools |", "|---|---|---|"]
        lines += [f"| `{k}` | {_fmt(n[k])} | {_fmt(n.get('peer/' + k))} |" for k in keys]
    else:
        lines += ["| key | scvi-scale |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(n[k])} |" for k in keys]
    return [*lines, ""]  # fmt: skip


def _write(report: Report, run: Any, data: Any, labels_key: str | None, batch_key: str | None) -> None:
    out = report.out
    n = report.numbers
    side = "peer/heldout/neg_elbo" in n
    lines = ["# Model quality report", ""]
    lines += [f"- run: `{run.path}`", f"- data: `{data if isinstance(data, (str, Path)) else type(data).__name__}`",
              f"- batch key: `{batch_key}`; labels key: `{labels_key}`", ""]  # fmt: skip
    lines += ["## Summary", ""]
    if side:
        lines += ["| key | what | better | scvi-scale | scvi-tools | ours / peer |", "|---|---|---|---|---|---|"]
    else:
        lines += ["| key | what | better | scvi-scale |", "|---|---|---|---|"]
    for key, what, better in _HEADLINE:
        if key not in n:
            continue
        row = f"| `{key}` | {what} | {better} | {_fmt(n[key])} |"
        if side:
            row += f" {_fmt(n.get('peer/' + key))} | {_fmt(n.get('ratio/' + key))} |"
        lines.append(row)
    lines += ["", *[f"- {note}" for note in report.notes], ""]
    lines += _timing_table(n, side)
    lines += ["## All numbers", "", "Every number in `report.json`, by key.", ""]
    lines += ["| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in n.items()]
    lines += ["", "## Figures", ""]
    for name, path in report.files.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({path.name})", ""]
    report.files["markdown"] = out / "report.md"
    report.files["json"] = out / "report.json"
    (out / "report.md").write_text("\n".join(lines))
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report.to_json(), indent=2))
    tmp.replace(out / "report.json")  # written last: its presence means the report is complete
