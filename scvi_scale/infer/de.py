"""Differential expression math, as scvi-tools 1.4.2's ``DifferentialComputation`` (``vanilla`` and ``change``).

What is streamed and what is not: scvi-tools draws ``S = n_samples_overall // n_cells + 1`` scale vectors for
every cell of a group and then keeps ``n_samples_overall`` of the ``S * n_cells`` rows, drawn uniformly with
replacement. :func:`draw_plan` draws those row numbers first, so only the chosen (cell, sample) pairs are decoded
(the same distribution, at most ``n_samples_overall`` forward rows per group, whatever the group's size), and
:class:`GroupCounts` accumulates the raw-count statistics of every cell of the group chunk by chunk. The rest
(pairing by batch, Bayes factors, pseudocounts, LFC summaries, the FDR flag) works on the sampled arrays, as
scvi-tools does.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "GroupCounts",
    "bayes_factors",
    "draw_plan",
    "fdr_de_prediction",
    "de_table",
    "estimate_pseudocounts_offset",
]

log = logging.getLogger(__name__)
EPS = 1e-8


@dataclass
class GroupCounts:
    """Raw-count statistics of a group, summed chunk by chunk: scvi-tools' ``scrna_raw_counts_properties``."""

    n_genes: int
    n: int = 0
    total_g: np.ndarray = field(init=False)
    nonzero_g: np.ndarray = field(init=False)
    normalized_g: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total_g = np.zeros(self.n_genes)
        self.nonzero_g = np.zeros(self.n_genes)
        self.normalized_g = np.zeros(self.n_genes)

    def add(self, x: sp.csr_matrix) -> None:
        """Add cells (CSR over the model's genes); counts are scaled to 1e4 per cell over those genes."""
        x = sp.csr_matrix(x)
        self.n += x.shape[0]
        self.total_g += np.asarray(x.sum(axis=0, dtype=np.float64)).ravel()
        self.nonzero_g += np.bincount(x.indices[x.data != 0], minlength=self.n_genes)
        totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        self.normalized_g += np.asarray(x.multiply(scale[:, None]).sum(axis=0)).ravel()

    @property
    def mean_g(self) -> np.ndarray:
        return self.total_g / max(self.n, 1)

    def properties(self, other: GroupCounts) -> dict[str, np.ndarray]:
        """``raw_mean1/2``, ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2`` (self is group 1)."""
        n1, n2 = max(self.n, 1), max(other.n, 1)
        return {
            "raw_mean1": self.total_g / n1,
            "raw_mean2": other.total_g / n2,
            "non_zeros_proportion1": self.nonzero_g / n1,
            "non_zeros_proportion2": other.nonzero_g / n2,
            "raw_normalized_mean1": self.normalized_g / n1,
            "raw_normalized_mean2": other.normalized_g / n2,
        }


def draw_plan(rng: np.random.Generator, n_cells: int, n_draws: int) -> tuple[np.ndarray, np.ndarray]:
    """Which (cell, sample) rows scvi-tools' ``n_samples_overall`` resampling keeps, computed up front.

    Returns ``(cells_u, inverse)``: the group-local cell of each distinct row kept, and for each of the
    ``n_draws`` draws (in draw order) its distinct row; decode ``cells_u`` once each, then index by ``inverse``.
    """
    per_cell = n_draws // n_cells + 1
    rows = rng.choice(per_cell * n_cells, n_draws, replace=True)  # rows of the flattened (S, n) array
    unique, inverse = np.unique(rows, return_inverse=True)
    return unique % n_cells, inverse


def estimate_pseudocounts_offset(scales_a: np.ndarray, scales_b: np.ndarray, where_zero_a: np.ndarray,
                                 where_zero_b: np.ndarray, quantile: float = 0.9) -> float:  # fmt: skip
    """scvi-tools' pseudocount: the 90% quantile of the max sampled scale of genes unseen in a group, over G."""
    max_a, max_b = np.max(scales_a, 0), np.max(scales_b, 0)
    eps_a = np.quantile(max_a[where_zero_a], q=quantile) if where_zero_a.sum() >= 1 else 1e-10
    eps_b = np.quantile(max_b[where_zero_b], q=quantile) if where_zero_b.sum() >= 1 else 1e-10
    return float(np.maximum(1e-10, np.maximum(eps_a, eps_b) / len(max_a)))


def _estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:  # pragma: no cover - scikit-learn comes with scvi-tools and scanpy
        from scvi_scale.store.errors import InputError

        raise InputError("delta=None estimates delta with scikit-learn's GaussianMixture; install scikit-learn "
                         "or pass a number (scvi-tools' default 0.25)") from None  # fmt: skip
    gmm = GaussianMixture(n_components=3).fit(lfc_means[:, None])
    vals = np.sort(gmm.means_.squeeze())
    return float(np.maximum(min_thres, coef * np.abs(vals[[0, -1]]).mean()))


def _credible_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-posterior-density interval per column (scvi-tools' ``credible_intervals``)."""
    ary = np.sort(samples, axis=0)
    n = ary.shape[0]
    inc = int(np.floor(level * n))
    if n - inc <= 0:
        raise ValueError("too few samples for a credible interval at this level")
    width = ary[inc:] - ary[: n - inc]
    lo = np.argmin(width, axis=0)
    cols = np.arange(ary.shape[1])
    return ary[lo, cols], ary[lo + inc, cols]


def _describe(samples: np.ndarray, levels: Sequence[float]) -> dict[str, np.ndarray]:
    props = {
        "mean": samples.mean(0),
        "median": np.median(samples, 0),
        "std": samples.std(0),
        "min": samples.min(0),
        "max": samples.max(0),
    }
    for level in levels:
        lo, hi = _credible_interval(samples, level)
        props[f"confidence_interval_{str(level)[:5]}_min"] = lo
        props[f"confidence_interval_{str(level)[:5]}_max"] = hi
    return {f"lfc_{k}": v for k, v in props.items()}


def _pairs(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, use_permutation: bool, m: int | None):
    if not use_permutation:
        return a, b
    return a[rng.choice(a.shape[0], size=m)], b[rng.choice(b.shape[0], size=m)]


def bayes_factors(
    scales1: np.ndarray,
    batches1: np.ndarray,
    scales2: np.ndarray,
    batches2: np.ndarray,
    *,
    mode: str,
    use_observed_batches: bool,
    raw_mean1: np.ndarray | None = None,
    raw_mean2: np.ndarray | None = None,
    delta: float | None = 0.25,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    test_mode: str = "three",
    cred_interval_lvls: Sequence[float] | None = None,
    use_permutation: bool = False,
    m_permutation: int = 10000,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray | float]:
    """scvi-tools' ``get_bayes_factors`` after sampling: pairs, then the vanilla or change-mode statistics.

    ``scales*`` are ``(n_draws, G)`` scale samples, ``batches*`` the batch each draw was conditioned on (-1 for
    observed batches); ``raw_mean*`` the groups' raw mean counts (for the pseudocount estimate of ``change``).
    """
    rng = rng or np.random.default_rng()
    mean1, mean2 = scales1.mean(axis=0), scales2.mean(axis=0)
    vals1, vals2 = set(np.unique(batches1).tolist()), set(np.unique(batches2).tolist())
    if vals1 == vals2 and not use_observed_batches:  # pairs conditioned on the same batch
        per_batch = m_permutation // len(vals1) if m_permutation is not None else None
        pairs = [
            _pairs(rng, scales1[batches1 == v], scales2[batches2 == v], use_permutation, per_batch)
            for v in sorted(vals1)
        ]
        s1, s2 = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    else:
        if not use_observed_batches and vals1 & vals2:
            warnings.warn("batchid1 and batchid2 differ but intersect: batch correction is not trustworthy "
                          "(as scvi-tools warns)", UserWarning, stacklevel=2)  # fmt: skip
        s1, s2 = _pairs(rng, scales1, scales2, use_permutation, m_permutation)
    if s1.shape[0] != s2.shape[0]:  # unequal batch lists: compare as many pairs as both have
        n = min(s1.shape[0], s2.shape[0])
        s1, s2 = s1[:n], s2[:n]
    if mode == "vanilla":
        p1 = np.mean(s1 > s2, 0)
        p2 = 1.0 - p1
        return {"proba_m1": p1, "proba_m2": p2, "bayes_factor": np.log(p1 + EPS) - np.log(p2 + EPS),
                "scale1": mean1, "scale2": mean2}  # fmt: skip
    if mode != "change":
        raise ValueError(f"unknown mode {mode!r}")
    if pseudocounts is None:
        assert raw_mean1 is not None and raw_mean2 is not None
        pseudocounts = estimate_pseudocounts_offset(s1, s2, raw_mean1 < threshold_counts, raw_mean2 < threshold_counts)
    lfc = np.log2(s1 + pseudocounts) - np.log2(s2 + pseudocounts)
    delta_ = _estimate_delta(lfc.mean(0)) if delta is None else delta
    plus, minus = np.mean(lfc >= delta_, 0), np.mean(lfc < -delta_, 0)
    proba_de = plus + minus if test_mode == "two" else np.maximum(plus, minus)
    # the LFC summaries use a 1000x smaller pseudocount (scvi-tools: "to correctly estimate log-fold change")
    small = 1e-3 * pseudocounts
    props = _describe(np.log2(s1 + small) - np.log2(s2 + small), cred_interval_lvls or [])
    return {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
        "scale1": mean1,
        "scale2": mean2,
        "pseudocounts": pseudocounts,
        "delta": delta_,
        **props,
    }


def fdr_de_prediction(posterior_probas: pd.Series, fdr: float = 0.05) -> pd.Series:
    """scvi-tools' posterior expected FDR: the largest top set (by proba_de) whose mean (1 - p) is <= ``fdr``."""
    sorted_p = posterior_probas.sort_values(ascending=False)
    cumulative = (1.0 - sorted_p).cumsum() / (1.0 + np.arange(len(sorted_p)))
    d = int((cumulative <= fdr).sum())
    flags = pd.Series(np.zeros(len(sorted_p), dtype=bool), index=sorted_p.index)
    flags.iloc[:d] = True
    return flags.loc[posterior_probas.index]


def de_table(info: dict[str, np.ndarray | float], genes: Sequence[str], mode: str, fdr: float,
             comparison: tuple[str, str] | None) -> pd.DataFrame:  # fmt: skip
    """The per-gene table in scvi-tools' layout: sorted by bayes_factor (vanilla) or proba_de (change)."""
    res = pd.DataFrame(info, index=pd.Index([str(g) for g in genes]))
    res = res.sort_values(by="proba_de" if mode == "change" else "bayes_factor", ascending=False)
    if mode == "change":
        res[f"is_de_fdr_{fdr}"] = fdr_de_prediction(res["proba_de"], fdr=fdr)
    if comparison is not None:
        res["comparison"] = f"{comparison[0]} vs {comparison[1]}"
        res["group1"], res["group2"] = comparison
    return res
