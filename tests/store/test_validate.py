"""Count validation: every failure is a one-line InputError naming the file, the row and the gene."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scvi_scale.store import InputError, check_count_block, validate_counts

SOURCE = "atlas_part3.h5ad"


def _counts(n_obs: int = 12, n_vars: int = 5, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    x_ng = np.random.default_rng(seed).poisson(3.0, (n_obs, n_vars)).astype(np.float32)
    x_ng[:, 0] += 1  # no empty cells
    return x_ng, [f"g{i}" for i in range(n_vars)]


def _raises(x, names, match_all: list[str], **kwargs) -> str:
    with pytest.raises(InputError) as info:
        validate_counts(x, names, SOURCE, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert SOURCE in msg
    for part in match_all:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc", "coo"])
def test_valid_counts_become_canonical_float32_csr(fmt: str) -> None:
    x_ng, names = _counts()
    x_in = x_ng if fmt == "dense" else sp.csr_matrix(x_ng).asformat(fmt)
    x, keep, n_dropped = validate_counts(x_in, names, SOURCE, chunk_rows=5)
    assert isinstance(x, sp.csr_matrix) and x.dtype == np.float32 and x.has_canonical_format
    np.testing.assert_array_equal(x.toarray(), x_ng)
    assert keep is None and n_dropped == 0


def test_integer_dtype_accepted() -> None:
    x_ng, names = _counts()
    x, _, _ = validate_counts(x_ng.astype(np.int64), names, SOURCE)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x.toarray(), x_ng)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_non_integer_names_row_and_gene(fmt: str) -> None:
    x_ng, names = _counts()
    x_ng[7, 3] = 0.693  # e.g. log-normalised data
    x_ng[9, 1] = 1.5  # a later offender is not the one reported
    x_in = x_ng if fmt == "dense" else sp.csr_matrix(x_ng).asformat(fmt)
    msg = _raises(x_in, names, ["non-integer", "row 7", "'g3'", "--layer counts"], chunk_rows=4)
    assert "row 9" not in msg


def test_non_integer_names_cell_when_obs_names_given() -> None:
    x_ng, names = _counts()
    x_ng[2, 4] = 2.25
    obs_names = [f"AAAC-{i}" for i in range(x_ng.shape[0])]
    _raises(x_ng, names, ["row 2 ('AAAC-2')", "'g4'"], obs_names=obs_names)


def test_negative_value() -> None:
    x_ng, names = _counts()
    x_ng[5, 2] = -1
    _raises(sp.csr_matrix(x_ng), names, ["negative", "-1", "row 5", "'g2'"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value(bad: float) -> None:
    x_ng, names = _counts()
    x_ng[11, 0] = bad
    _raises(sp.csr_matrix(x_ng), names, ["non-finite", "row 11", "'g0'"], chunk_rows=5)


def test_empty_cells_error_names_count_and_first_row() -> None:
    x_ng, names = _counts()
    x_ng[[4, 8]] = 0
    _raises(sp.csr_matrix(x_ng), names, ["2 of 12 cells", "row 4", "--drop-empty-cells"], chunk_rows=3)


def test_drop_empty_cells_reports_count() -> None:
    x_ng, names = _counts()
    x_ng[[4, 8]] = 0
    x, keep, n_dropped = validate_counts(sp.csr_matrix(x_ng), names, SOURCE, drop_empty_cells=True, chunk_rows=3)
    assert n_dropped == 2
    assert keep.dtype == bool and keep.sum() == 10 and not keep[4] and not keep[8]
    np.testing.assert_array_equal(x.toarray(), np.delete(x_ng, [4, 8], axis=0))


def test_all_cells_empty_is_an_error_even_when_dropping() -> None:
    _raises(np.zeros((3, 2)), ["a", "b"], ["all 3 cells"], drop_empty_cells=True)


def test_explicit_zeros_do_not_hide_an_empty_cell() -> None:
    x = sp.csr_matrix((np.array([0.0, 2.0], np.float32), np.array([0, 1]), np.array([0, 1, 2])), shape=(2, 2))
    _raises(x, ["a", "b"], ["1 of 2 cells", "row 0"])


def test_duplicated_gene_names_listed_in_file_order() -> None:
    x_ng, _ = _counts(n_vars=6)
    names = ["ZZZ", "CD4", "MT-1", "CD4", "ZZZ", "B2M"]
    msg = _raises(x_ng, names, ["2 gene names are duplicated", "'ZZZ'", "'CD4'", "var_names_make_unique"])
    assert msg.index("'ZZZ'") < msg.index("'CD4'")


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty_matrix(shape: tuple[int, int]) -> None:
    _raises(sp.csr_matrix(shape, dtype=np.float32), [f"g{i}" for i in range(shape[1])], ["empty", "cells x"])


def test_gene_name_count_mismatch() -> None:
    x_ng, names = _counts()
    _raises(x_ng, names[:-1], ["5 genes but 4 gene names"])


def test_non_numeric_dtype() -> None:
    _raises(np.array([["1", "2"]], dtype=object), ["a", "b"], ["dtype object"])


def test_caller_matrix_not_reordered_in_place() -> None:
    # Non-canonical CSR (unsorted indices, a duplicate entry): the result is canonical, the input untouched.
    data = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    indices = np.array([2, 0, 0, 1])
    x = sp.csr_matrix((data, indices, np.array([0, 2, 4])), shape=(2, 3))
    out, _, _ = validate_counts(x, ["a", "b", "c"], SOURCE)
    np.testing.assert_array_equal(out.toarray(), [[2, 0, 1], [3, 4, 0]])
    np.testing.assert_array_equal(x.indices, indices)


def test_check_count_block_uses_global_rows_and_returns_totals() -> None:
    x_ng, names = _counts()
    totals = check_count_block(sp.csr_matrix(x_ng), SOURCE, names, row_offset=1000)
    np.testing.assert_allclose(totals, x_ng.sum(axis=1))
    x_ng[3, 1] = 0.5
    with pytest.raises(InputError, match="row 1003"):
        check_count_block(x_ng, SOURCE, names, row_offset=1000)
