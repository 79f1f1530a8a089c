"""``scvi-scale report`` end to end on a small Zarr store; report.json holds every number report.md shows."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from scvi_scale import api
from scvi_scale.cli import main
from scvi_scale.report.build import _fmt, build_report
from tests.report import report_fixtures

trained_run = report_fixtures.trained_run  # the shared session fixture


@pytest.fixture(scope="module")
def small_store(small_atlas, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_store") / "small.zarr"
    api.convert(small_atlas, out, progress=False)
    return out


def _markdown_numbers(text: str) -> list[tuple[str, str]]:
    """Every number cell of the tables whose rows start with a `key`, as (report.json key, cell text).

    The column says which key: scvi-scale's and plain values are the row's key, scvi-tools' ``peer/<key>``,
    the ratio column ``ratio/<key>``.
    """
    prefix = {"scvi-scale": "", "value": "", "scvi-tools": "peer/", "ours / peer": "ratio/"}
    found, header = [], []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "key":
            header = cells
            continue
        m = re.fullmatch(r"`([^`]+)`", cells[0])
        if not m or not header:
            continue
        for col, cell in zip(header, cells, strict=True):
            if col in prefix:
                found.append((prefix[col] + m.group(1), cell))
    return found


def test_report_cli_end_to_end(trained_run, small_store, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["report", str(trained_run.path), str(small_store), "--out", str(out), "--labels-key", "cell_type",
               "--metrics", "own", "--view", "pca", "--n-mc-samples", "10", "--max-ll-cells", "40",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Report(" in printed and "report.md" in printed
    for name in ("report.md", "report.json", "loss_curves.png", "embedding.png"):
        assert (out / name).stat().st_size > 0, name
    numbers = json.loads((out / "report.json").read_text())["numbers"]
    for key in ("heldout/neg_elbo", "marginal_ll", "integration/total", "integration/batch", "integration/bio",
                "timing/epoch_s_total", "timing/step_s_per_epoch", "timing/cells_per_s_median"):  # fmt: skip
        assert numbers[key] is not None and math.isfinite(numbers[key]), key
    assert numbers["timing/epochs"] == 8
    # every number the Markdown shows is in the JSON under the key of its row
    md = (out / "report.md").read_text()
    shown = _markdown_numbers(md)
    assert {"heldout/neg_elbo", "marginal_ll", "integration/total", "timing/step_s_total"} <= {k for k, _ in shown}
    for key, cell in shown:
        assert key in numbers, key
        assert cell == _fmt(numbers[key]), (key, cell)
    assert all(cell != "n/a" for key, cell in shown if key.startswith(("heldout/", "timing/")))
    assert "![embedding](embedding.png)" in md
    # a second run into the same directory is refused without --overwrite (exit 2)
    rc = main(["report", str(trained_run.path), str(small_store), "--out", str(out), "--metrics", "own"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_report_cli_bad_labels_key_exits_2(trained_run, small_store, tmp_path, capsys):
    rc = main(["report", str(trained_run.path), str(small_store), "--out", str(tmp_path / "r"),
               "--labels-key", "celltype", "--metrics", "own"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "'celltype'" in err and "batch" in err and "cell_type" in err
    assert not (tmp_path / "r" / "report.json").exists()


def test_build_report_returns_numbers_and_figures(trained_run, small_atlas):
    report = build_report(trained_run, small_atlas, None, labels_key="cell_type", marginal_ll=False,
                          use_scib=False, view="pca", max_cells=300)  # fmt: skip
    assert "heldout/neg_elbo=" in repr(report) and "integration/total=" in repr(report)
    assert set(report.figures) == {"loss_curves", "embedding"}
    assert report.figures["embedding"].axes  # matplotlib Figures, for a notebook
    assert report.numbers["integration/n_cells"] == 300


@pytest.mark.slow
@pytest.mark.parity
def test_side_by_side_peer_on_the_same_cells(trained_run, small_atlas, tmp_path):
    pytest.importorskip("scvi")
    report = build_report(trained_run, small_atlas, tmp_path / "r", labels_key="cell_type", side_by_side=True,
                          epochs=3, n_mc_samples=10, max_ll_cells=30, use_scib=False, view="pca")  # fmt: skip
    n = report.numbers
    assert n["peer/epochs"] == 3
    assert n["peer/heldout/n_cells"] == n["heldout/n_cells"] and n["peer/heldout/is_validation_split"] == 1.0
    assert n["ratio/heldout/neg_elbo"] == pytest.approx(n["heldout/neg_elbo"] / n["peer/heldout/neg_elbo"])
    assert {"peer_embedding", "peer_loss_curves"} <= set(report.figures)
    peer_split = np.load(tmp_path / "r" / "peer" / "run" / "split.npz")
    ours_split = np.load(trained_run.path / "split.npz")
    assert np.array_equal(peer_split["validation"], ours_split["validation"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| scvi-scale | scvi-tools | ours / peer |" in md
    numbers = json.loads((tmp_path / "r" / "report.json").read_text())["numbers"]
    shown = _markdown_numbers(md)
    assert {"peer/heldout/neg_elbo", "ratio/integration/total", "peer/timing/epoch_s_total"} <= {k for k, _ in shown}
    for key, cell in shown:  # "n/a" is no number: a peer without that timing, or a NaN (null in the JSON)
        assert cell == _fmt(numbers.get(key)), (key, cell)
    # refuses data above its cell limit, with the reason
    from scvi_scale.report.peer import train_peer
    from scvi_scale.store.errors import InputError

    with pytest.raises(InputError, match="small-data comparison"):
        train_peer(trained_run, small_atlas, tmp_path / "p", max_cells=100)
