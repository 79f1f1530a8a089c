"""docs/config.md is generated from the config dataclasses: it must be up to date."""

from __future__ import annotations

from pathlib import Path

from scvi_scale import config_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text() == config_doc.render(), (
        f"{DOC} is out of date with the config dataclasses; regenerate it with: {config_doc.REGENERATE}"
    )
