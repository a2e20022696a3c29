"""The benchmark's statistics as small pure functions (numpy/scipy in, numbers out), tested on hand-made inputs.

    mean, std = mean_std([0.71, 0.72, 0.73])            # sample std (ddof=1)
    fmt_mean_std([0.71, 0.72, 0.73])                    # '0.7200 ± 0.0100'
    t, p = welch_ttest(pimm_aucs, baseline_aucs)        # one-sided H1: mean(a) > mean(b), unequal variances
    expected_calibration_error(probs, labels)           # 10 equal-mass (quantile) bins
    capture_at(scores, labels, [0.01, 0.05, 0.10])      # positives among the top 1/5/10% by score (ties averaged)
    relative_lift(120, 100)                             # 0.2
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

ALTERNATIVES = ("greater", "two-sided")
ECE_STRATEGIES = ("quantile", "uniform")


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as "mean ± std over seeds" is usually reported).

    The std is NaN for fewer than 2 values (undefined, not 0); the mean is NaN for none.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
    return float(x.mean()), std


def fmt_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """'mean ± std' with `digits` decimals; the mean alone for a single value, '–' for none."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def welch_ttest(a: Sequence[float], b: Sequence[float], alternative: str = "greater") -> Tuple[float, float]:
    """Welch's t-test (unequal variances) of mean(a) vs mean(b): (t, p).

    alternative="greater": one-sided, H1 mean(a) > mean(b) (the claim "a beats b"); "two-sided": H1 means differ.
    (NaN, NaN) when the test is undefined: fewer than 2 values on a side, or no variance on either side.
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {list(ALTERNATIVES)}, got {alternative!r}")
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2 or (x.var(ddof=1) == 0.0 and y.var(ddof=1) == 0.0):
        return float("nan"), float("nan")
    from scipy import stats

    res = stats.ttest_ind(x, y, equal_var=False, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of `probs` (n,) against 0/1 `labels` (n,); probs clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10,
                               strategy: str = "quantile") -> float:
    """ECE = sum over bins of (rows in bin / rows) * |mean predicted probability - observed positive rate|.

    strategy="quantile": `bins` equal-mass bins, edges at the quantiles of the predictions (rows with equal predictions
    share a bin, so bins are equal-mass up to ties) — informative for rare targets, whose predictions would all fall
    into the first of 10 equal-width bins; "uniform": equal-width bins [0, 1/bins), ..., [1 - 1/bins, 1]. Empty bins
    are skipped.
    """
    if strategy not in ECE_STRATEGIES:
        raise ValueError(f"strategy must be one of {list(ECE_STRATEGIES)}, got {strategy!r}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n = p.size
    if n == 0:
        return float("nan")
    if strategy == "quantile":  # edges at the 1/bins, 2/bins, ... quantiles; equal predictions share a bin
        inner = np.quantile(p, np.linspace(0.0, 1.0, bins + 1)[1:-1])
        idx = np.searchsorted(inner, p, side="right")  # (n,) bin of each row
    else:
        idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    psum = np.bincount(idx, weights=p, minlength=bins)
    ysum = np.bincount(idx, weights=y, minlength=bins)
    full = count > 0
    return float(np.abs(psum[full] - ysum[full]).sum() / n)  # |mean p - mean y| * count = |psum - ysum|


def budget_rows(n: int, fraction: float) -> int:
    """Rows selected by a budget of `fraction` of `n` rows (rounded half up, within [0, n])."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"budget fraction must be in [0, 1], got {fraction}")
    return min(n, int(math.floor(fraction * n + 0.5)))


def capture_at(scores: np.ndarray, labels: np.ndarray, fractions: Sequence[float]) -> List[float]:
    """Positives among the top `fraction` of rows by score, for each fraction (one sort for all of them).

    Rows tied with the last selected row are taken at random in expectation: if k - a rows are still to be chosen
    from a tie group of m rows holding q positives, they add (k - a) * q / m. So a constant scorer captures exactly
    the random-targeting expectation, and the result never depends on row order.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n = s.size
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if n else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], n]  # exclusive end of each tie group
    cum = np.r_[0.0, np.cumsum(y)]  # cum[i]: positives among the first i rows
    out = []
    for f in fractions:
        k = budget_rows(n, f)
        if k == 0:
            out.append(0.0)
            continue
        g = int(np.searchsorted(ends, k, side="left"))  # the tie group holding row k-1: starts[g] < k <= ends[g]
        a, e = int(starts[g]), int(ends[g])
        out.append(float(cum[a] + (k - a) * (cum[e] - cum[a]) / (e - a)))
    return out


def relative_lift(a: float, b: float) -> float:
    """a / b - 1 (0.2 = a captures 20% more than b); inf when b is 0 and a > 0, NaN when both are 0."""
    if b == 0:
        return float("inf") if a > 0 else float("nan")
    return float(a / b - 1.0)


def select_lr(valid_scores: Dict[float, Sequence[float]]) -> float:
    """The learning rate whose seeds have the highest mean validation score; ties go to the smaller rate.

    valid_scores: lr -> the validation scores (one per finished seed); rates with no score are skipped.
    """
    scored = {lr: float(np.mean(v)) for lr, v in valid_scores.items() if len(v) and not np.isnan(np.mean(v))}
    if not scored:
        raise ValueError("no learning rate has a finished run")
    return max(sorted(scored), key=lambda lr: scored[lr])  # max() keeps the first of equal keys: the smaller lr


def best_baseline(means: Dict[str, float], exclude: str) -> str:
    """The model other than `exclude` with the highest mean (NaNs skipped); '' when there is none."""
    cands = {m: v for m, v in means.items() if m != exclude and not math.isnan(v)}
    return max(cands, key=lambda m: cands[m]) if cands else ""
