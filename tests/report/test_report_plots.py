"""Report figures: written PNGs are valid images, and missing or partial inputs still give a figure."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scvi_scale.report.plots import plot_embedding, plot_loss_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _metrics_frame(n_epochs: int = 12) -> pd.DataFrame:
    epoch = np.arange(n_epochs)
    kl_weight = np.minimum(1.0, (epoch + 1) / 5)
    recon = 900 - 40 * np.log1p(epoch)
    kl = 20 + 5 * np.log1p(epoch)
    val_every_3 = np.where(epoch % 3 == 0, 1.0, np.nan)
    return pd.DataFrame(
        {
            "epoch": epoch,
            "step": (epoch + 1) * 10,
            "kl_weight": kl_weight,
            "train/loss": recon + kl_weight * kl,
            "train/elbo": recon + kl,
            "train/reconstruction_loss": recon,
            "train/kl_local": kl,
            "validation/elbo": (recon + kl + 15) * val_every_3,
            "validation/reconstruction_loss": (recon + 12) * val_every_3,
            "validation/kl_local": (kl + 3) * val_every_3,
            "perf/cells_per_s": 5e4,
        }
    )


def test_loss_curves_from_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    _metrics_frame().to_csv(csv, index=False)
    out = tmp_path / "nested" / "loss.png"
    fig = plot_loss_curves(csv, path=out, title="run 1")
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    width, height = _png_size(out)
    assert width > 400 and height > 300
    assert out.stat().st_size > 10_000
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["ELBO", "Loss (with KL weight)", "Reconstruction loss", "KL divergence (local)"]
    assert fig.axes[-1].get_ylabel() == "KL weight"
    elbo_lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(elbo_lines) == {"train", "validation"}
    assert len(elbo_lines["validation"].get_xdata()) == 4  # NaN epochs are skipped, not drawn as gaps


def test_loss_curves_with_missing_columns(tmp_path):
    df = _metrics_frame()[["epoch", "train/loss", "train/reconstruction_loss"]]
    df = df.assign(**{"validation/elbo": np.nan})  # present but empty: no ELBO panel
    fig = plot_loss_curves(df, path=tmp_path / "partial.png")
    assert [ax.get_title() for ax in fig.axes] == ["Loss (with KL weight)", "Reconstruction loss"]
    _png_size(tmp_path / "partial.png")


def test_loss_curves_without_epoch_or_data(tmp_path):
    only_kl = plot_loss_curves(pd.DataFrame({"kl_weight": [0.1, 0.5, 1.0]}), path=tmp_path / "kl.png")
    assert only_kl.axes[0].get_xlabel() == "row"
    empty = plot_loss_curves(pd.DataFrame({"epoch": [0, 1], "perf/epoch_s": [1.0, 1.1]}), path=tmp_path / "e.png")
    assert len(empty.axes) == 1
    for name in ("kl.png", "e.png"):
        _png_size(tmp_path / name)


def test_loss_curves_without_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(plot_loss_curves(_metrics_frame()), Figure)
    assert list(tmp_path.iterdir()) == []


def test_plot_embedding(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    coords = rng.normal(size=(n, 2))
    batch = rng.choice(np.array(["lab A", "lab B", "lab C"]), size=n)
    cell_type = rng.integers(0, 30, size=n)  # more categories than the legend shows
    donor = rng.choice(np.array(["d1", "d2", None], dtype=object), size=n)  # missing values
    out = tmp_path / "embedding.png"
    fig = plot_embedding(coords, {"batch": batch, "cell type": cell_type, "donor": donor}, path=out, title="scVI")
    width, height = _png_size(out)
    assert width > 3 * height  # three panels side by side
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["batch", "cell type", "donor"]
    batch_legend = [t.get_text() for t in panels[0].get_legend().get_texts()]
    assert batch_legend == ["lab A", "lab B", "lab C"]
    type_legend = [t.get_text() for t in panels[1].get_legend().get_texts()]
    assert len(type_legend) == 21 and type_legend[-1] == "... 10 more"
    assert "NA" in [t.get_text() for t in panels[2].get_legend().get_texts()]
    # one shuffled scatter per panel: points of one batch are not drawn as one block
    colours = panels[0].collections[0].get_facecolors()
    first_change = np.argmax(np.any(colours[1:] != colours[:-1], axis=1))
    assert first_change < 20


def test_plot_embedding_draw_order_is_seeded():
    coords = np.random.default_rng(0).normal(size=(200, 2))
    labels = np.repeat(["a", "b"], 100)
    offsets = [
        plot_embedding(coords, {"x": labels}, seed=s).axes[0].collections[0].get_offsets().copy() for s in (1, 1, 2)
    ]
    np.testing.assert_array_equal(offsets[0], offsets[1])
    assert not np.array_equal(offsets[0], offsets[2])


def test_plot_embedding_rejects_bad_shapes():
    coords = np.zeros((10, 2))
    with pytest.raises(ValueError, match="shape"):
        plot_embedding(np.zeros((10, 3)), {"x": np.zeros(10)})
    with pytest.raises(ValueError, match="9 values for 10 cells"):
        plot_embedding(coords, {"x": np.zeros(9)})
    assert isinstance(plot_embedding(coords, {}), Figure)  # no colouring: plain grey points
