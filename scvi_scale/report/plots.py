"""Report figures: training curves from ``metrics.csv`` and categorical scatter plots of 2-D embeddings.

Figures are built as ``matplotlib.figure.Figure`` objects with an Agg canvas attached, never through pyplot,
so nothing depends on (or changes) the global backend or current-figure state: safe in threads, notebooks
and headless jobs. Every function returns its Figure and writes a PNG when given a path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["plot_embedding", "plot_loss_curves"]

log = logging.getLogger(__name__)

# (panel title, columns drawn in it); a panel is drawn when at least one of its columns has a finite value.
_LOSS_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ELBO", ("train/elbo", "validation/elbo")),
    ("Loss (with KL weight)", ("train/loss", "validation/loss")),
    ("Reconstruction loss", ("train/reconstruction_loss", "validation/reconstruction_loss")),
    ("KL divergence (local)", ("train/kl_local", "validation/kl_local")),
)
_KL_WEIGHT = "kl_weight"
_MISSING_LABEL = "NA"
_MISSING_COLOR = (0.8, 0.8, 0.8, 1.0)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path | None, dpi: int) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    log.info("wrote %s", path)


def _finite_series(df: pd.DataFrame, x: np.ndarray, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) for the rows where ``column`` is a finite number, or None when there are none."""
    if column not in df.columns:
        return None
    y = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(x)
    return (x[ok], y[ok]) if ok.any() else None


def plot_loss_curves(
    metrics: str | Path | pd.DataFrame, path: str | Path | None = None, title: str | None = None, dpi: int = 120
) -> Figure:
    """Per-epoch training curves.

    Panels, each drawn only if its columns hold data: ELBO (train vs validation), the optimised loss (which
    includes the KL warm-up weight), reconstruction loss and local KL, plus a short strip with ``kl_weight``.
    Missing columns and NaN entries (e.g. validation run every few epochs) are skipped; sparse series get
    markers so a single point is still visible.

    Parameters
    ----------
    metrics
        Path to a ``metrics.csv`` written by training, or the same table as a DataFrame. The x axis is the
        ``epoch`` column, or the row number when there is none.
    path
        Where to write a PNG; nothing is written when None.
    title
        Figure title.
    dpi
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = metrics if isinstance(metrics, pd.DataFrame) else pd.read_csv(metrics)
    if "epoch" in df.columns:
        x = pd.to_numeric(df["epoch"], errors="coerce").to_numpy(dtype=np.float64)
        x_label = "epoch"
    else:
        x = np.arange(len(df), dtype=np.float64)
        x_label = "row"

    panels = []
    for panel_title, columns in _LOSS_PANELS:
        series = {c: s for c in columns if (s := _finite_series(df, x, c)) is not None}
        if series:
            panels.append((panel_title, series))
    kl_weight = _finite_series(df, x, _KL_WEIGHT)

    n_cols = max(len(panels), 1)
    has_strip = kl_weight is not None
    fig = _new_figure(4.0 * n_cols, 3.6 + (1.2 if has_strip else 0.0))
    grid = fig.add_gridspec(2 if has_strip else 1, n_cols, height_ratios=[3.0, 1.0] if has_strip else None)
    if title:
        fig.suptitle(title)

    if not panels and not has_strip:
        ax = fig.add_subplot(grid[0, 0])
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no loss columns to plot", ha="center", va="center")
    for i, (panel_title, series) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        for column, (xs, ys) in series.items():
            split = column.split("/", 1)[0]
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2, label=split)
        ax.set_title(panel_title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if has_strip:
        ax = fig.add_subplot(grid[1, :])
        xs, ys = kl_weight
        ax.plot(xs, ys, color="0.3", linewidth=1.2, marker="o" if len(xs) <= 30 else None, markersize=3)
        ax.set_ylabel("KL weight")
        ax.set_xlabel(x_label)
        ax.set_ylim(-0.05, max(1.05, float(ys.max()) * 1.05))
        ax.grid(alpha=0.3)
    _save(fig, path, dpi)
    return fig


def _categories(values_n: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes (-1 for missing) and category names, sorted as pandas sorts them."""
    if not isinstance(values_n, pd.Series | pd.Categorical):
        values_n = np.asarray(values_n).reshape(-1)
    cat = pd.Categorical(values_n)
    return np.asarray(cat.codes, dtype=np.int64), [str(c) for c in cat.categories]


def _palette(n: int) -> np.ndarray:
    """n distinct RGBA colours: tab10 / tab20 when they suffice, else evenly spaced over a wide colormap."""
    if n <= 10:
        return matplotlib.colormaps["tab10"](np.arange(n))
    if n <= 20:
        return matplotlib.colormaps["tab20"](np.arange(n))
    return matplotlib.colormaps["nipy_spectral"](np.linspace(0.03, 0.97, n))


def plot_embedding(
    coords_n2: np.ndarray,
    colors: Mapping[str, np.ndarray],
    path: str | Path | None = None,
    title: str | None = None,
    max_legend: int = 20,
    point_size: float | None = None,
    seed: int = 0,
    dpi: int = 120,
) -> Figure:
    """Scatter plots of a 2-D embedding, one panel per categorical colouring.

    Points are drawn in one seeded random order shared by all panels, so no batch or cell type is painted
    over the others. Missing values (NaN/None) are grey and listed as ``NA``.

    Parameters
    ----------
    coords_n2
        2-D coordinates, one row per cell (see :func:`scvi_scale.report.embed2d.embed_2d`).
    colors
        Panel name -> per-cell category, e.g. ``{"batch": batch_n, "cell type": labels_n}``.
    path
        Where to write a PNG; nothing is written when None.
    title
        Figure title.
    max_legend
        At most this many categories (the most frequent) are listed in a panel's legend; the rest are counted.
    point_size
        Marker area in points^2; by default it shrinks with the number of cells.
    seed
        Seed of the drawing order.
    dpi
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    coords_n2 = np.asarray(coords_n2, dtype=np.float64)
    if coords_n2.ndim != 2 or coords_n2.shape[1] != 2:
        raise ValueError(f"coords must have shape (n, 2), got {coords_n2.shape}")
    n = coords_n2.shape[0]
    for name, values in colors.items():
        if len(values) != n:
            raise ValueError(f"colouring {name!r} has {len(values)} values for {n} cells")
    if point_size is None:
        point_size = float(np.clip(60_000 / max(n, 1), 0.5, 20.0))
    order_n = np.random.default_rng(seed).permutation(n)

    n_panels = max(len(colors), 1)
    fig = _new_figure(5.2 * n_panels, 4.6)
    if title:
        fig.suptitle(title)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    if not colors:
        axes[0].scatter(coords_n2[order_n, 0], coords_n2[order_n, 1], s=point_size, c="0.4", linewidths=0)
    for ax, (name, values) in zip(axes, colors.items(), strict=False):
        codes_n, names = _categories(values)
        palette = _palette(len(names))
        rgba_n4 = np.tile(_MISSING_COLOR, (n, 1))
        known_n = codes_n >= 0
        rgba_n4[known_n] = palette[codes_n[known_n]]
        ax.scatter(
            coords_n2[order_n, 0],
            coords_n2[order_n, 1],
            c=rgba_n4[order_n],
            s=point_size,
            linewidths=0,
            rasterized=n > 5000,  # keeps vector exports small; PNG output is unaffected
        )
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
        _legend(ax, codes_n, names, palette, max_legend)
    _save(fig, path, dpi)
    return fig


def _legend(ax: Axes, codes_n: np.ndarray, names: list[str], palette: np.ndarray, max_legend: int) -> None:
    """Legend beside the axes with the ``max_legend`` most frequent categories, plus a count of the others."""
    counts = np.bincount(codes_n[codes_n >= 0], minlength=len(names))
    entries = [(names[i], palette[i], counts[i]) for i in range(len(names)) if counts[i] > 0]
    n_missing = int(np.sum(codes_n < 0))
    if n_missing:
        entries.append((_MISSING_LABEL, np.asarray(_MISSING_COLOR), n_missing))
    if not entries:
        return
    shown = entries
    if len(entries) > max_legend:
        # keep the most frequent categories, listed in their usual order so the legend stays easy to scan
        keep = sorted(sorted(range(len(entries)), key=lambda i: -entries[i][2])[:max_legend])
        shown = [entries[i] for i in keep]
    handles = [
        Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor=color, markeredgewidth=0, label=label)
        for label, color, _ in shown
    ]
    if len(entries) > len(shown):
        handles.append(Line2D([], [], linestyle="", label=f"... {len(entries) - len(shown)} more"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize="small",
        frameon=False,
        ncols=1 if len(handles) <= 12 else 2,
        handletextpad=0.2,
    )
