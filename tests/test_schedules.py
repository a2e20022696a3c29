"""Curriculum schedules beyond the paper's eq. (4): step_linear, cosine, constant, adaptive; and their config."""

import math

import pytest

from pimm_model.config import CurriculumConfig
from pimm_model.schedules import PER_STEP_SCHEDULES, SCHEDULES, curriculum_p, previous_task_auc

INDUSTRIAL = dict(alpha=2 / 3, speed=1 / 3, beta=0.0)


def test_registry_and_per_step_set():
    assert {"epoch_linear", "step_linear", "cosine", "constant", "adaptive"} <= set(SCHEDULES)
    assert PER_STEP_SCHEDULES == {"step_linear"} and PER_STEP_SCHEDULES <= set(SCHEDULES)


def test_step_linear_falls_every_step_and_meets_epoch_linear_at_epoch_starts():
    cfg = CurriculumConfig(name="step_linear", **INDUSTRIAL)
    n = 4
    got = [curriculum_p(cfg, e, s, n) for e in range(3) for s in range(n)]
    expected = [max(2 / 3 - (e + s / n) / 3, 0.0) for e in range(3) for s in range(n)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(a > b for a, b in zip(got[:8], got[1:8]))  # strictly falling until the floor
    assert curriculum_p(cfg, 1, 2, n) == pytest.approx(2 / 3 - 1.5 / 3)  # halfway through epoch 1
    epoch_cfg = CurriculumConfig(name="epoch_linear", **INDUSTRIAL)
    for e in range(4):
        assert curriculum_p(cfg, e, 0, n) == pytest.approx(curriculum_p(epoch_cfg, e))
    # floor beta (Ali-CCP preset: alpha 0.5, S 0.25, beta 0.25)
    ali = CurriculumConfig(name="step_linear", alpha=0.5, speed=0.25, beta=0.25)
    assert [curriculum_p(ali, 0, s, 2) for s in range(2)] + [curriculum_p(ali, 5, 1, 2)] == [0.5, 0.375, 0.25]


def test_step_linear_one_epoch_run_still_follows_the_curriculum():
    cfg = CurriculumConfig(name="step_linear", alpha=1.0, speed=1.0, beta=0.0)
    assert [curriculum_p(cfg, 0, s, 10) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])


def test_cosine_from_alpha_to_beta_over_total_epochs():
    cfg = CurriculumConfig(name="cosine", alpha=0.8, beta=0.2, total_epochs=4)
    got = [curriculum_p(cfg, e) for e in range(6)]
    expected = [0.2 + 0.6 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)] + [0.2, 0.2]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] == pytest.approx(0.8) and got[2] == pytest.approx(0.5) and got[4] == pytest.approx(0.2)
    assert curriculum_p(cfg, 1, 1, 2) == pytest.approx(0.2 + 0.3 * (1 + math.cos(math.pi * 1.5 / 4)))  # mid-epoch
    assert all(a >= b for a, b in zip(got, got[1:]))


def test_constant_ignores_epoch_step_and_metrics():
    cfg = CurriculumConfig(name="constant", alpha=0.3, beta=0.1)
    assert {curriculum_p(cfg, e, s, 5, {"auc": {"a": 0.9, "b": 0.9}}) for e in range(3) for s in range(5)} == {0.3}


@pytest.mark.parametrize("metrics, expected", [
    (None, 0.6),                                                             # no validation yet: alpha
    ({}, 0.6),
    ({"auc": {"click": 0.5, "conv": 0.9}}, 0.6),                             # previous task at chance: alpha
    ({"auc": {"click": 0.45, "conv": 0.9}}, 0.6),                            # below chance: still alpha
    ({"auc": {"click": 0.625, "conv": 0.9}}, 0.6 - 0.5 * 0.5),               # halfway to the 0.75 target
    ({"auc": {"click": 0.75, "conv": 0.5}}, 0.1),                            # target reached: beta (last task unused)
    ({"auc": {"click": 0.95, "conv": 0.5}}, 0.1),
    ({"auc": {"click": 0.9, "conv": 0.6, "core": 0.99}}, 0.6 - 0.5 * 0.4),   # the worst previous task decides
    ({"auc": {"click": float("nan"), "conv": 0.6, "core": 0.7}}, 0.6 - 0.5 * 0.4),  # NaN AUCs are skipped
    ({"auc": {"click": float("nan"), "conv": 0.9}}, 0.6),
])
def test_adaptive(metrics, expected):
    cfg = CurriculumConfig(name="adaptive", alpha=0.6, beta=0.1, auc_target=0.75)
    assert curriculum_p(cfg, 2, 0, 10, metrics) == pytest.approx(expected, abs=1e-12)


def test_previous_task_auc():
    assert previous_task_auc({"auc": {"a": 0.7, "b": 0.6, "c": 0.1}}) == 0.6
    assert previous_task_auc({"auc": {"a": 0.7}}) is None


def test_every_schedule_stays_in_range():
    for name in SCHEDULES:
        cfg = CurriculumConfig(name=name, alpha=1.0, speed=0.7, beta=0.0, total_epochs=2)
        for e in range(5):
            for s in range(3):
                assert 0.0 <= curriculum_p(cfg, e, s, 3, {"auc": {"a": 0.8, "b": 0.7}}) <= 1.0


@pytest.mark.parametrize("kwargs, key", [(dict(total_epochs=0), "total_epochs"), (dict(auc_target=0.5), "auc_target"),
                                         (dict(auc_target=1.2), "auc_target")])
def test_new_curriculum_keys_are_validated(kwargs, key):
    with pytest.raises(ValueError, match=rf"curriculum\.{key}"):
        CurriculumConfig(**kwargs)
