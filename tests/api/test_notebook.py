"""examples/notebook_s3.ipynb runs, top to bottom, against the S3 test server: it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook_s3.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_s3_notebook_executes(s3_env: str, s3_atlas: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for name, value in {
        "SCVI_SCALE_STORE": s3_atlas,
        "SCVI_SCALE_RUN_DIR": str(tmp_path / "run"),
        "SCVI_SCALE_EPOCHS": "2",
        "SCVI_SCALE_VIEW": "pca",  # UMAP's first call compiles for ~20 s
        "OPENBLAS_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    stderr = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
    for noise in ("Warning", "WARNING", "INFO", "Traceback"):  # progress bars only, no log spam
        assert noise not in stderr, stderr[-2000:]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curves and the embedding
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "scvi-scale Run" in html and "validation/elbo" in html
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "atlas_config.yaml").is_file()
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
