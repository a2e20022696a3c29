"""PIM module (eq. (4)-(6)), attention (eq. (1)-(3)), curriculum schedules and their config."""

import math

import pytest
import torch

from pimm_model.config import CurriculumConfig, ModelConfig
from pimm_model.layers import AttentionTransfer
from pimm_model.pim import PIM
from pimm_model.schedules import SCHEDULES, curriculum_p, register_schedule


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- PIM


def test_pim_truncates_gradient_through_y_star():
    # previous tower: prob = sigmoid(a * x); h_prev is a constant, so the only way back to `a` is through y*
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.tensor(0.7))
    x = torch.randn(64)
    pim = PIM(4).train()
    for p, labels in [(0.0, torch.ones(64)), (0.5, torch.ones(64)), (0.0, None)]:
        prev_prob = torch.sigmoid(a * x)
        zm = pim(prev_prob, labels, torch.zeros(64, 4), p)
        zm.pow(2).sum().backward()
        assert a.grad is None or torch.all(a.grad == 0), f"gradient leaked through y* (p={p})"
        assert pim.weight.grad is not None and pim.weight.grad.abs().sum() > 0
        pim.zero_grad()


def test_pim_does_not_truncate_h_prev():
    pim = PIM(3).train()
    h_prev = torch.randn(5, 3, requires_grad=True)
    pim(torch.rand(5), torch.ones(5), h_prev, 0.5).sum().backward()
    assert h_prev.grad is not None and torch.allclose(h_prev.grad, torch.ones(5, 3))


@pytest.mark.parametrize("p", [0.25, 0.5, 0.9])
def test_pim_label_fraction_matches_p(p):
    torch.manual_seed(1)
    n = 20000
    pim = PIM(2).train()
    prev_prob = torch.full((n,), 0.5)
    labels = torch.ones(n)
    with torch.no_grad():
        pim.weight.fill_(1.0)
        zm = pim(prev_prob, labels, torch.zeros(n, 2), p)
    frac = float(pim.last_label_fraction)
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    # the rows that took the label are exactly those with Z = sigmoid(1 * 1)
    took = torch.isclose(zm[:, 0], torch.tensor(_sigmoid(1.0)))
    assert took.float().mean().item() == pytest.approx(frac)


def test_pim_p1_labels_only_p0_predictions_only():
    torch.manual_seed(2)
    pim = PIM(3).train()
    prev_prob = torch.rand(100)
    labels = (torch.rand(100) > 0.5).float()
    h = torch.zeros(100, 3)
    z1 = pim(prev_prob, labels, h, 1.0)
    assert float(pim.last_label_fraction) == 1.0
    assert torch.allclose(z1, torch.sigmoid(labels[:, None] * pim.weight))
    z0 = pim(prev_prob, labels, h, 0.0)
    assert float(pim.last_label_fraction) == 0.0
    assert torch.allclose(z0, torch.sigmoid(prev_prob[:, None] * pim.weight))


def test_pim_eval_never_reads_labels():
    pim = PIM(4).eval()
    prev_prob, h = torch.rand(8), torch.randn(8, 4)
    expected = pim(prev_prob, None, h, 1.0)
    assert torch.equal(pim(prev_prob, torch.full((8,), float("nan")), h, 1.0), expected)
    assert torch.equal(pim(prev_prob, torch.ones(8), h, 1.0), expected)
    assert torch.allclose(expected, torch.sigmoid(prev_prob[:, None] * pim.weight) + h)


def test_pim_training_without_labels_uses_predictions():
    pim = PIM(2).train()
    prev_prob, h = torch.rand(6), torch.randn(6, 2)
    assert torch.allclose(pim(prev_prob, None, h, 1.0), torch.sigmoid(prev_prob[:, None] * pim.weight) + h)


def test_pim_golden_values():
    pim = PIM(3).train()
    with torch.no_grad():
        pim.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    labels = torch.tensor([1.0, 0.0])
    h = torch.tensor([[0.1, 0.2, 0.3], [-1.0, 0.0, 1.0]])
    zm = pim(torch.tensor([0.3, 0.8]), labels, h, 1.0)
    expected = torch.tensor(
        [
            [_sigmoid(1.0) + 0.1, _sigmoid(-2.0) + 0.2, _sigmoid(0.5) + 0.3],  # y* = 1
            [0.5 - 1.0, 0.5 + 0.0, 0.5 + 1.0],  # y* = 0: sigmoid(0) = 0.5
        ]
    )
    assert torch.allclose(zm, expected, atol=1e-6)
    pim.eval()  # y* = predictions 0.3 and 0.8
    zm = pim(torch.tensor([0.3, 0.8]), labels, h, 1.0)
    w = [1.0, -2.0, 0.5]
    expected = torch.tensor([[_sigmoid(y * wi) for wi in w] for y in (0.3, 0.8)]) + h
    assert torch.allclose(zm, expected, atol=1e-6)


def test_pim_scripts():
    pim = torch.jit.script(PIM(3).train())
    pim(torch.rand(10), torch.ones(10), torch.zeros(10, 3), 1.0)
    assert float(pim.last_label_fraction) == 1.0


# ---------------------------------------------------------------- attention, eq. (1)-(3)


def _set_attention(att: AttentionTransfer, q, k, v) -> None:
    with torch.no_grad():
        for lin, w in ((att.q, q), (att.k, k), (att.v, v)):
            lin.weight.copy_(torch.tensor(w))
            lin.bias.zero_()


def test_attention_weights_sum_to_one():
    torch.manual_seed(3)
    att = AttentionTransfer(8)
    _, w = att.forward_with_weights(torch.randn(32, 8) * 10, torch.randn(32, 8) * 10)
    assert w.shape == (32, 2)
    assert torch.allclose(w.sum(dim=1), torch.ones(32))
    assert torch.all(w >= 0)


def test_attention_golden_uses_query_dot_key_of_same_input():
    att = AttentionTransfer(2)
    # Q = I, K = diag(1, 3), V = 2 I (nn.Linear computes x @ W^T; these are symmetric)
    _set_attention(att, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, 0.0]])
    zm = torch.tensor([[0.0, 2.0]])
    u, w = att.forward_with_weights(v, zm)
    s_v = (1 * 1 + 0 * 0) / math.sqrt(2)  # Q(v)·K(v) = [1,0]·[1,0]
    s_z = (0 * 0 + 2 * 6) / math.sqrt(2)  # Q(zm)·K(zm) = [0,2]·[0,6]
    w_v = math.exp(s_v) / (math.exp(s_v) + math.exp(s_z))
    w_z = 1 - w_v
    expected_u = [1.0 + w_v * 2.0 + w_z * 0.0, 0.0 + w_v * 0.0 + w_z * 4.0]
    assert torch.allclose(w, torch.tensor([[w_v, w_z]]), atol=1e-6)
    assert torch.allclose(u, torch.tensor([expected_u]), atol=1e-6)
    assert torch.allclose(att(v, zm), u)
    # the buggy Q·V score would give different weights: [1,0]·[2,0] and [0,2]·[0,4]
    s_v_bug, s_z_bug = 2 / math.sqrt(2), 8 / math.sqrt(2)
    w_v_bug = math.exp(s_v_bug) / (math.exp(s_v_bug) + math.exp(s_z_bug))
    assert abs(w[0, 0].item() - w_v_bug) > 1e-3


def test_attention_is_residual_on_v():
    att = AttentionTransfer(3)
    with torch.no_grad():
        att.v.weight.zero_()
        att.v.bias.zero_()
    v = torch.randn(4, 3)
    assert torch.equal(att(v, torch.randn(4, 3)), v)


# ---------------------------------------------------------------- schedules and config, eq. (4)


@pytest.mark.parametrize(
    "alpha, speed, beta, expected",
    [
        (0.5, 0.25, 0.25, [0.5, 0.25, 0.25, 0.25]),  # Ali-CCP preset
        (2 / 3, 1 / 3, 0.0, [2 / 3, 1 / 3, 0.0, 0.0]),  # industrial preset
    ],
)
def test_epoch_linear_paper_presets(alpha, speed, beta, expected):
    cfg = CurriculumConfig(name="epoch_linear", alpha=alpha, speed=speed, beta=beta)
    got = [curriculum_p(cfg, epoch) for epoch in range(4)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(0.0 <= p <= 1.0 for p in got)


def test_constant_schedule():
    cfg = CurriculumConfig(name="constant", alpha=0.7, speed=0.5, beta=0.1)
    assert [curriculum_p(cfg, e) for e in range(3)] == [0.7, 0.7, 0.7]


def test_unknown_schedule_lists_registered_names():
    with pytest.raises(KeyError, match="epoch_linear"):
        curriculum_p(CurriculumConfig(name="nope"), 0)


def test_register_schedule_rejects_duplicates():
    assert {"epoch_linear", "constant"} <= set(SCHEDULES)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("constant")(lambda cfg, e, s, n, m: 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0.5, beta=0.6), r"curriculum\.beta \(0\.6\) must be <= curriculum\.alpha \(0\.5\)"),
        (dict(alpha=1.5, beta=0.0), r"curriculum\.alpha"),
        (dict(alpha=0.5, beta=-0.1), r"curriculum\.beta"),
        (dict(speed=-0.1), r"curriculum\.speed"),
    ],
)
def test_curriculum_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurriculumConfig(**kwargs)


def test_model_config_validation():
    assert ModelConfig().tower_dims == [128, 64, 32]
    with pytest.raises(ValueError, match="model.tower_dims"):
        ModelConfig(tower_dims=[])
    with pytest.raises(ValueError, match="model.dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="model.embedding_dim"):
        ModelConfig(embedding_dim=0)
