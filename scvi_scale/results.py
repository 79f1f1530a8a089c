"""What the Python API hands back and how it shows itself: summaries (text and notebook HTML) and figures.

Kept apart from :mod:`scvi_scale.api` so that the API module holds the work and this one the presentation:
:class:`Evaluation` (the dict :func:`~scvi_scale.api.evaluate` returns), the text and HTML summaries of a
:class:`~scvi_scale.api.Run`, the one-paragraph summary of a ``prepare``, and the figures (matplotlib
``Figure`` objects, drawn by :mod:`scvi_scale.report.plots`, never through pyplot's global state).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from scvi_scale.api import Run
    from scvi_scale.prep.prepare import PrepareResult


def _import_tqdm_auto_quietly() -> None:
    """Import ``tqdm.auto`` once, without its "IProgress not found" warning.

    In Jupyter, ``tqdm.auto`` draws widget bars when ipywidgets is installed; without it, it warns on import and
    falls back to the text bar, which renders well in a notebook too. The warning is the only thing a normal run
    would print besides its bars, so it is dropped here (once: the module is cached, and every progress bar in
    scvi-scale comes from it).
    """
    import warnings

    from tqdm.std import TqdmWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*IProgress not found.*", category=TqdmWarning)
        import tqdm.auto  # noqa: F401


_import_tqdm_auto_quietly()

# the columns a run's summary shows, in this order, when the metrics have them
SUMMARY_COLUMNS = ("epoch", "train/elbo", "validation/elbo", "kl_weight", "perf/cells_per_s")
_RUN_FILES = ("config.yaml", "model.pt", "metrics.csv", "split.npz", "checkpoints/last.pt")


class Evaluation(dict):
    """The per-cell negative ELBO and its parts (a plain ``dict``, so ``json.dumps`` takes it as it is).

    Keys: ``n_cells``, ``elbo`` (= ``reconstruction_loss + kl_local``), ``reconstruction_loss``, ``kl_local``,
    ``kl_global``; lower is better.
    """

    def __repr__(self) -> str:
        return (
            f"Evaluation(n_cells={self['n_cells']}, elbo={self['elbo']:.4f}: reconstruction_loss="
            f"{self['reconstruction_loss']:.4f} + kl_local={self['kl_local']:.4f})"
        )

    def __str__(self) -> str:
        return "\n".join(f"{k:>20}  {v}" for k, v in self.items())

    def _repr_html_(self) -> str:
        return pd.DataFrame({"value": pd.Series(dict(self), dtype=object)}).to_html()


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def metrics_table(metrics: pd.DataFrame, last: int = 5) -> pd.DataFrame:
    """The last ``last`` epochs of a run's metrics, in the columns a summary shows."""
    columns = [c for c in SUMMARY_COLUMNS if c in metrics.columns]
    return metrics[columns].tail(last).reset_index(drop=True) if columns else pd.DataFrame()


def _run_facts(run: Run) -> list[tuple[str, str]]:
    m = run.config.model
    batches = f"{len(run.batch_categories)} batch{'es' if len(run.batch_categories) != 1 else ''}"
    batches += f" (obs['{run.batch_key}'])" if run.batch_key else ""
    facts = [
        ("path", str(run.path) if run.path is not None else "(in memory)"),
        ("data", f"{len(run.var_names)} genes, {batches}" + (f", layer {run.layer!r}" if run.layer else "")),
        (
            "model",
            f"{m.gene_likelihood}, {m.n_latent} latent, {m.n_layers} x {m.n_hidden} hidden, dispersion {m.dispersion}",
        ),
    ]
    metrics = run.metrics
    if len(metrics):
        planned = f" of {run.max_epochs}" if run.max_epochs and run.max_epochs != len(metrics) else ""
        trained = f"{len(metrics)} epochs{planned}, seed {run.config.train.seed}"
        if "perf/cells_per_s" in metrics:
            trained += f", median {metrics['perf/cells_per_s'].median():,.0f} cells/s"
        facts.append(("trained", trained))
    if run.path is not None:
        files = [f for f in _RUN_FILES if (run.path / f).exists()]
        facts.append(("files", ", ".join(files) if files else "(none yet)"))
    return facts


def run_summary(run: Run, last: int = 5) -> str:
    """A few lines on a run: where it is, what it was trained on, and its last epochs' metrics."""
    lines = [f"{k:<8} {v}" for k, v in _run_facts(run)]
    table = metrics_table(run.metrics, last)
    if len(table):
        text = table.to_string(index=False, formatters={c: _fmt for c in table.columns if c != "epoch"})
        lines += ["metrics (last epochs):", *("  " + line for line in text.splitlines())]
    return "\n".join(lines)


def run_html(run: Run, last: int = 5) -> str:
    """The notebook display of a run: the same facts as :func:`run_summary`, with the metrics as a table."""
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in _run_facts(run)
    )
    table = metrics_table(run.metrics, last)
    metrics = ""
    if len(table):
        body = table.to_html(index=False, formatters={c: _fmt for c in table.columns if c != "epoch"}, border=0)
        metrics = f"<div><b>metrics</b> (last {len(table)} epochs)</div>{body}"
    return f"<div><b>scvi-scale Run</b><table>{rows}</table>{metrics}</div>"


def prepare_summary(result: PrepareResult) -> str:
    """Three lines on a ``prepare``: the genes selected, the library priors, where they were recorded."""
    batches = result.batch_categories
    key = result.record.get("batch_key")
    by = f"ranked in {len(batches)} batches of '{key}'" if key else "one batch"
    shown = ", ".join(batches[:8]) + (" ..." if len(batches) > 8 else "")
    where = result.recorded_in or "memory only (not a count store)"
    return "\n".join(
        [
            f"{result.source}: {result.hvg_index.size} highly variable genes of {result.var.shape[0]} "
            f"(seurat_v3, {by})",
            f"library-size priors for {len(batches)} batch{'es' if len(batches) != 1 else ''}: {shown}",
            f"recorded in {where}: var columns {', '.join(result.var.columns)}; metadata 'prepare'",
        ]
    )


class ProgressLoader:
    """A loader that ticks a tqdm bar (terminal or notebook) per minibatch; everything else is the inner one's."""

    def __init__(self, inner: Any, enabled: bool, desc: str, total_cells: int) -> None:
        self.inner, self.enabled, self.desc, self.total = inner, enabled, desc, total_cells

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __iter__(self) -> Iterator[Any]:
        from tqdm.auto import tqdm

        with tqdm(total=self.total, unit="cells", unit_scale=True, desc=self.desc, disable=not self.enabled) as bar:
            for batch in self.inner:
                yield batch
                bar.update(batch.n_obs)


# ---- figures ----


def plot_losses(
    run: Run | str | Path | pd.DataFrame, path: str | Path | None = None, title: str | None = None
) -> Figure:
    """Training curves of a run (ELBO, loss, reconstruction, KL and the KL weight per epoch) as a Figure.

    Parameters
    ----------
    run
        A :class:`~scvi_scale.api.Run`, a run directory, a ``metrics.csv`` or the metrics as a DataFrame.
    path
        Also write a PNG here.
    title
        Figure title.

    Examples
    --------
    >>> ss.plot_losses("runs/a")  # doctest: +SKIP
    <Figure size 1600x480 with 5 Axes>
    """
    from scvi_scale.report.plots import plot_loss_curves

    if isinstance(run, pd.DataFrame):
        metrics = run
    elif isinstance(run, str | Path):
        metrics = pd.read_csv(Path(run) / "metrics.csv") if Path(run).is_dir() else pd.read_csv(run)
    else:
        metrics = run.metrics
        title = title or (f"scVI training: {run.path.name}" if run.path is not None else "scVI training")
    return plot_loss_curves(metrics, path=path, title=title)


def plot_embedding(
    data: Any,
    color: str | Sequence[str] | None = None,
    *,
    basis: str = "X_scvi",
    method: str = "auto",
    path: str | Path | None = None,
    title: str | None = None,
    seed: int = 0,
    obs: pd.DataFrame | None = None,
) -> Figure:
    """A 2-D view of an embedding, one panel per ``obs`` column to colour by, as a matplotlib Figure.

    Parameters
    ----------
    data
        An AnnData with ``obsm[basis]`` (what :func:`scvi_scale.api.embed` returns), or an ``n x k`` array
        with ``obs`` given.
    color
        ``obs`` columns, one panel each; default: the run's batch column (``uns["scvi_scale"]["batch_key"]``)
        and ``cell_type`` when present.
    basis
        The ``obsm`` key to draw.
    method
        ``"umap"``, ``"pca"`` or ``"auto"`` (UMAP when umap-learn is installed); a 2-column embedding is drawn as
        it is.
    path
        Also write a PNG here.
    title, seed
        Figure title; seed of the 2-D layout and the drawing order.
    obs
        Cell metadata when ``data`` is an array.

    Examples
    --------
    >>> adata = ss.embed(run, "atlas.zarr")  # doctest: +SKIP
    >>> ss.plot_embedding(adata, color=["batch", "cell_type"])  # doctest: +SKIP
    <Figure size 1040x460 with 2 Axes>
    """
    from scvi_scale.report.embed2d import embed_2d
    from scvi_scale.report.plots import plot_embedding as draw

    if hasattr(data, "obsm"):
        if basis not in data.obsm:
            raise KeyError(f"obsm has no {basis!r}; it has {', '.join(data.obsm.keys()) or 'nothing'}")
        z, obs = np.asarray(data.obsm[basis]), data.obs if obs is None else obs
        uns = dict(getattr(data, "uns", {}).get("scvi_scale", {}))
    else:
        z, uns = np.asarray(data), {}
        obs = obs if obs is not None else pd.DataFrame(index=pd.RangeIndex(len(z)))
    if color is None:
        color = [c for c in (uns.get("batch_key") or None, "cell_type") if c and c in obs.columns]
    columns = [color] if isinstance(color, str) else list(color)
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise KeyError(f"obs has no column {missing[0]!r}; it has {', '.join(map(str, obs.columns)) or 'none'}")
    if z.shape[1] == 2:
        coords, shown = z, basis
    else:
        coords, shown = embed_2d(z, seed=seed, method=method)
    colors: Mapping[str, Iterable[Any]] = {c: obs[c].to_numpy() for c in columns}
    return draw(coords, colors, path=path, title=title or f"{basis} ({shown})", seed=seed)
