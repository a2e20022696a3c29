"""The benchmark's statistics on hand-made inputs with known answers."""

import math

import numpy as np
import pytest

from launch.bench_stats import (
    best_baseline,
    budget_rows,
    capture_at,
    expected_calibration_error,
    fmt_mean_std,
    log_loss,
    mean_std,
    relative_lift,
    select_lr,
    welch_ttest,
)

# Wikipedia, "Welch's t-test", worked examples (published: t = -2.46, df = 24.99, p = 0.021 two-sided; and
# t = -1.57, df = 9.90, p = 0.149 two-sided)
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
B1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
B2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5,
      21.5, 21.8]


def test_welch_matches_the_published_examples():
    t, p = welch_ttest(A1, A2, alternative="two-sided")
    assert t == pytest.approx(-2.46, abs=0.005) and p == pytest.approx(0.021, abs=0.0005)
    t, p = welch_ttest(B1, B2, alternative="two-sided")
    assert t == pytest.approx(-1.57, abs=0.005) and p == pytest.approx(0.149, abs=0.0005)


def test_welch_statistic_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 1.0]
    # t = (2.5 - 0.5) / sqrt(var_a / 4 + var_b / 3), var_a = 5/3, var_b = 1/4
    t, _ = welch_ttest(a, b)
    assert t == pytest.approx(2.0 / math.sqrt(5 / 12 + 1 / 12))


def test_welch_one_sided_is_half_the_two_sided_in_the_claimed_direction():
    _, p2 = welch_ttest(A2, A1, alternative="two-sided")
    _, p1 = welch_ttest(A2, A1, alternative="greater")  # A2 has the larger mean
    assert p1 == pytest.approx(p2 / 2)
    _, p_wrong_way = welch_ttest(A1, A2, alternative="greater")  # claiming the smaller mean is larger
    assert p_wrong_way == pytest.approx(1 - p2 / 2)


def test_welch_equal_samples_and_undefined_cases():
    assert welch_ttest([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, pytest.approx(0.5))
    assert welch_ttest([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "two-sided")[1] == pytest.approx(1.0)
    for a, b in (([0.7], [0.6, 0.5]), ([0.7, 0.7], [0.6, 0.6])):  # one seed; no variance at all
        t, p = welch_ttest(a, b)
        assert math.isnan(t) and math.isnan(p)
    with pytest.raises(ValueError):
        welch_ttest(A1, A2, alternative="less")


def test_mean_std_and_format():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (ddof=1)
    assert fmt_mean_std([0.71, 0.72, 0.73]) == "0.7200 ± 0.0100"
    assert fmt_mean_std([0.5]) == "0.5000"  # one value: no std
    assert fmt_mean_std([]) == "–"
    assert math.isnan(mean_std([0.5])[1])


def test_ece_uniform_bins_by_hand():
    probs = np.array([0.05, 0.05, 0.95, 0.95])
    labels = np.array([0, 0, 1, 0])
    # bin 0: |0.05 - 0| * 2/4 = 0.025; bin 9: |0.95 - 0.5| * 2/4 = 0.225
    assert expected_calibration_error(probs, labels, 10, "uniform") == pytest.approx(0.25)
    assert expected_calibration_error(probs, labels, 2, "quantile") == pytest.approx(0.25)


def test_ece_perfect_and_constant_predictions():
    assert expected_calibration_error(np.full(10, 0.5), np.array([0, 1] * 5)) == pytest.approx(0.0)
    # a constant 0.1 against a 50% rate: one group whatever the binning, |0.1 - 0.5| = 0.4
    for strategy in ("uniform", "quantile"):
        assert expected_calibration_error(np.full(10, 0.1), np.array([1] * 5 + [0] * 5), 10, strategy) == \
            pytest.approx(0.4)


def test_ece_quantile_bins_split_rare_scores():
    # 100 rows all below 0.1: equal-width bins see one bin (mean p 0.0495 vs rate 0.05, ECE ~ 0), equal-mass bins
    # see that the low half holds all positives and the high half none
    probs = np.linspace(0.0, 0.099, 100)
    labels = np.zeros(100)
    labels[:5] = 1
    assert expected_calibration_error(probs, labels, 10, "uniform") == pytest.approx(abs(probs.mean() - 0.05))
    q = expected_calibration_error(probs, labels, 2, "quantile")
    assert q == pytest.approx(0.5 * abs(probs[:50].mean() - 0.1) + 0.5 * abs(probs[50:].mean() - 0.0))


def test_log_loss_by_hand():
    assert log_loss(np.array([0.8, 0.4]), np.array([1, 0])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_capture_without_ties():
    scores = np.array([0.6, 0.9, 0.7, 0.8])
    labels = np.array([0, 1, 1, 0])  # by score: 0.9 (pos), 0.8, 0.7 (pos), 0.6
    assert capture_at(scores, labels, [0.25, 0.5, 0.75, 1.0]) == [1.0, 1.0, 2.0, 2.0]
    assert capture_at(scores, labels, [0.0]) == [0.0]


def test_capture_averages_over_ties():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    labels = np.array([0, 1, 0, 0, 1])
    # top 2: the 0.9 row (negative) and one of three tied rows holding one positive -> 1/3 expected
    assert capture_at(scores, labels, [0.4]) == [pytest.approx(1 / 3)]
    assert capture_at(scores, labels, [0.8]) == [pytest.approx(1.0)]  # the whole tie group
    # order of the input rows does not matter
    perm = np.array([3, 0, 4, 2, 1])
    assert capture_at(scores[perm], labels[perm], [0.4, 0.6]) == capture_at(scores, labels, [0.4, 0.6])


def test_constant_scorer_captures_the_random_expectation():
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0])
    assert capture_at(np.zeros(10), labels, [0.1, 0.5]) == [pytest.approx(0.3), pytest.approx(1.5)]


def test_budget_rows_rounds_half_up():
    assert budget_rows(1000, 0.01) == 10
    assert budget_rows(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert budget_rows(10, 0.05) == 1 and budget_rows(10, 0.04) == 0
    with pytest.raises(ValueError):
        budget_rows(10, 1.5)


def test_relative_lift():
    assert relative_lift(120, 100) == pytest.approx(0.2)
    assert relative_lift(90, 100) == pytest.approx(-0.1)
    assert relative_lift(5, 0) == float("inf") and math.isnan(relative_lift(0, 0))


def test_select_lr_by_mean_validation_score_ties_to_smaller():
    assert select_lr({0.001: [0.70, 0.72], 0.002: [0.71, 0.73], 0.0005: [0.5]}) == 0.002
    assert select_lr({0.002: [0.7], 0.001: [0.7]}) == 0.001
    assert select_lr({0.001: [0.6], 0.002: []}) == 0.001  # a rate whose runs all failed is skipped
    with pytest.raises(ValueError):
        select_lr({0.001: []})


def test_best_baseline_excludes_pimm_and_nan():
    assert best_baseline({"pimm": 0.9, "esmm": 0.7, "aitm": 0.71, "ple": float("nan")}, "pimm") == "aitm"
    assert best_baseline({"pimm": 0.9}, "pimm") == ""
