"""Every registered head (one parametrised test), then model-specific golden tests with fixed initialisation."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from pimm_model.config import ModelConfig
from pimm_model.export import inference_model_from_state
from pimm_model.layers import AttentionTransfer, chain_marginal_logits
from pimm_model.losses import label_constraint, multitask_bce
from pimm_model.model import MultiTaskTrain, build_model
from pimm_model.models.aitm import AITMHead
from pimm_model.models.esmm import ESMMHead
from pimm_model.models.linear import LinearHead
from pimm_model.models.mmoe import MMoEHead
from pimm_model.models.mncm import MNCMHead
from pimm_model.models.ple import PLEHead
from pimm_model.registry import MODELS, build_head

FIELDS = [("user", 11), ("item", 7), ("ctx", 5)]
EMB = 4  # >= the number of tasks, so the linear head is a per-task logistic regression too


def _cfg(name: str, **over) -> ModelConfig:
    kw = dict(name=name, embedding_dim=EMB, tower_dims=[16, 8], expert_dims=[12], dropout=0.1, num_experts=3,
              num_shared_experts=2, num_task_experts=2, num_levels=2)
    kw.update(over)
    return ModelConfig(**kw)


def _chain_labels(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    return torch.cumprod((torch.rand(b, t, generator=g) > 0.4).float(), dim=1)  # y_t = 1 only if y_{t-1} = 1


def _ids(b: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randint(0, num, (b,), generator=g) for _, num in FIELDS], dim=1)  # (B, F)


def _kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(  # key-major: all rows of field 0, then field 1, ...
        keys=[name for name, _ in FIELDS], values=ids.t().reshape(-1),
        lengths=torch.ones(ids.numel(), dtype=torch.int64),
    )


def _batch(ids, labels, weights=None):
    weights = torch.ones(ids.shape[0]) if weights is None else weights
    return SimpleNamespace(features=_kjt(ids), labels=labels, weights=weights)


# ---------------------------------------------------------------- every registered model


def _check_train_step(train: MultiTaskTrain, batch, num_tasks: int) -> None:
    """Shapes, a finite loss, and a finite gradient on EVERY parameter (DDP runs with find_unused_parameters=False)."""
    train.zero_grad(set_to_none=True)
    loss, (per_task, logits, labels, weights) = train(batch)
    b = batch.labels.shape[0]
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    assert per_task.shape == (num_tasks,) and logits.shape == (b, num_tasks) and not logits.requires_grad
    assert torch.isfinite(logits).all() and torch.isfinite(per_task).all()
    assert labels is batch.labels and weights is batch.weights
    loss.backward()
    for pname, param in train.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("num_tasks", [2, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model(name, num_tasks):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cfg = _cfg(name)
    model = build_model(cfg, FIELDS, num_tasks, torch.device("cpu"))
    head = model.head
    train = MultiTaskTrain(model).train()
    train.set_p(0.5)
    opt = torch.optim.SGD(train.parameters(), lr=0.05)

    # ---- a training step: shapes, loss, a gradient on every parameter; a few steps move the weights off init
    for _ in range(3):
        ids = _ids(32, g)
        _check_train_step(train, _batch(ids, _chain_labels(32, num_tasks, g)), num_tasks)
        opt.step()

    # ---- extreme inputs: all-zero labels, a batch of one, padding rows (zero weight), huge embeddings
    _check_train_step(train, _batch(_ids(16, g), torch.zeros(16, num_tasks)), num_tasks)
    _check_train_step(train, _batch(_ids(1, g), torch.zeros(1, num_tasks)), num_tasks)
    _check_train_step(train, _batch(_ids(1, g), torch.ones(1, num_tasks)), num_tasks)
    _check_train_step(train, _batch(_ids(8, g), torch.ones(8, num_tasks), torch.tensor([1.0] * 3 + [0.0] * 5)),
                      num_tasks)
    _check_train_step(train, _batch(_ids(4, g), torch.zeros(4, num_tasks), torch.zeros(4)), num_tasks)
    x_huge = torch.randn(16, len(FIELDS) * EMB, generator=g) * 1e4
    for labels in (torch.zeros(16, num_tasks), torch.ones(16, num_tasks)):
        head.zero_grad(set_to_none=True)
        logits = head(x_huge, labels, 0.5)
        loss, per_task = multitask_bce(logits, labels, torch.ones(16))
        if train.head_has_extra_loss:
            loss = loss + head.extra_loss(logits, labels, torch.ones(16))
        loss.backward()
        assert torch.isfinite(logits).all() and torch.isfinite(loss), name
        assert all(torch.isfinite(q.grad).all() for q in head.parameters() if q.grad is not None), name

    # ---- train vs eval: eval is deterministic and never reads labels; dropout acts in training only
    x = torch.randn(20, len(FIELDS) * EMB, generator=g)
    ones = torch.ones(20, num_tasks)
    model.eval()
    with torch.no_grad():
        e = head(x)
        assert e.shape == (20, num_tasks) and torch.equal(e, head(x))
        assert torch.equal(e, head(x, ones, 1.0))
        assert torch.equal(e, head(x, torch.full((20, num_tasks), float("nan")), 1.0))
        assert head(x[:1]).shape == (1, num_tasks)
        if any(isinstance(m, nn.Dropout) for m in head.modules()):
            model.train()
            assert not torch.allclose(head(x, ones, 0.0), e), "dropout should act in training mode"
            model.eval()

    # ---- export: torchrec-free InferenceModel (state dict round trip), scripted, equals the eager eval model;
    # the head also traces with torch.fx (what torchrec's train pipelines do to a model)
    inf = torch.jit.script(inference_model_from_state(cfg, FIELDS, num_tasks, model.state_dict()))
    ids = _ids(50, g)
    with torch.no_grad():
        expected = torch.sigmoid(model(_kjt(ids)))
        assert (inf(ids) - expected).abs().max().item() <= 1e-6
        kjt = _kjt(ids)
        assert (inf.forward_jagged(kjt.values(), kjt.lengths()) - expected).abs().max().item() <= 1e-6
        traced = torch.fx.symbolic_trace(head, concrete_args={"labels": None, "p": 0.0})
        assert (traced(x) - e).abs().max().item() <= 1e-6


def test_registry_holds_the_papers_models():
    assert {"shared_bottom", "esmm", "mmoe", "ple", "aitm", "mncm", "pimm", "linear"} <= set(MODELS)


@pytest.mark.parametrize("name", ["aitm", "mncm", "pimm"])
def test_chained_models_need_two_tasks(name):
    with pytest.raises(ValueError, match="at least 2 tasks"):
        build_head(_cfg(name), 12, 1)


@pytest.mark.parametrize("key, value", [
    ("expert_dims", []), ("expert_dims", [0]), ("num_experts", 0), ("num_shared_experts", 0),
    ("num_task_experts", 0), ("num_levels", 0), ("aitm_constraint_weight", -0.1),
])
def test_model_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"model\.{key}"):
        ModelConfig(**{key: value})


# ---------------------------------------------------------------- ESMM and the chain product


def test_esmm_marginals_are_the_chain_product_and_loss_is_bce_of_the_product():
    torch.manual_seed(0)
    head = ESMMHead(12, 3, [16, 8], 0.0).eval()
    x = torch.randn(64, 12) * 3
    marginal, cond = head.forward_with_conditionals(x)
    product = torch.cumprod(torch.sigmoid(cond), dim=1)  # (B, T)  p_t = prod_{s<=t} q_s
    assert torch.allclose(torch.sigmoid(marginal), product, atol=1e-6)
    assert torch.equal(marginal[:, 0], cond[:, 0])
    assert torch.equal(head(x), marginal)
    labels = _chain_labels(64, 3, torch.Generator().manual_seed(2))
    weights = torch.tensor([1.0] * 60 + [0.0] * 4)
    _, per_task = multitask_bce(marginal, labels, weights)
    direct = torch.stack([F.binary_cross_entropy(product[:60, t], labels[:60, t]) for t in range(3)])
    assert torch.allclose(per_task, direct, atol=1e-5)


def test_chain_marginal_logits_golden_and_stable():
    # q = sigmoid(0) = 1/2 twice: p_1 = 1/4, logit = log(1/3)
    got = chain_marginal_logits(torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(got, torch.tensor([[0.0, math.log(1 / 3)]]), atol=1e-6)
    # extreme conditionals: finite logits and gradients, sigmoid still the product
    cond = torch.tensor([[50.0, 50.0, 50.0], [-50.0, 3.0, 2.0], [200.0, 200.0, 200.0], [-1e4, 1e4, -1e4],
                         [1e-3, -1e-3, 30.0], [0.5, 40.0, -2.0]], requires_grad=True)
    out = chain_marginal_logits(cond)
    assert torch.isfinite(out).all()
    product = torch.cumprod(torch.sigmoid(cond.double()), dim=1)
    assert torch.allclose(torch.sigmoid(out.double()), product, atol=1e-6)
    for labels in (torch.zeros(6, 3), torch.ones(6, 3)):
        cond.grad = None
        multitask_bce(chain_marginal_logits(cond), labels, torch.ones(6))[0].backward()
        assert torch.isfinite(cond.grad).all()


def test_linear_head_plain_and_chain_factorised():
    torch.manual_seed(1)
    x = torch.randn(10, 15)
    plain = LinearHead(15, 3, chain_factorised=False)
    assert torch.equal(plain(x), plain.linear(x))  # logit_t = w_t · x + b_t
    chain = LinearHead(15, 3, chain_factorised=True)
    scores = chain.linear(x)
    assert torch.allclose(torch.sigmoid(chain(x)), torch.cumprod(torch.sigmoid(scores), dim=1), atol=1e-6)
    assert build_head(_cfg("linear", linear_chain_factorised=True), 15, 3).chain_factorised


# ---------------------------------------------------------------- AITM: constraint and attention


def _logit(p):
    p = torch.tensor(p, dtype=torch.float32)
    return torch.log(p) - torch.log1p(-p)


def test_label_constraint_is_a_mean_over_rows_and_pairs():
    logits = _logit([[0.5, 0.7, 0.2], [0.9, 0.3, 0.6], [0.4, 0.4, 0.1], [0.1, 0.9, 0.9]])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last row is padding
    # excess max(ŷ_t - ŷ_{t-1}, 0): row 0 -> 0.2, 0; row 1 -> 0, 0.3; row 2 -> 0, 0 => 0.5 over 3 rows x 2 pairs
    got = label_constraint(logits, weights)
    assert got.item() == pytest.approx(0.5 / 6, abs=1e-6)
    assert abs(got.item() - 0.5) > 0.1 and abs(got.item() - 0.5 / 3) > 0.01  # not a sum over rows, nor over pairs
    assert label_constraint(logits, torch.zeros(4)).item() == 0.0
    head = AITMHead(4, 3, [4], 0.0, 0.6)
    assert head.extra_loss(logits, torch.zeros(4, 3), weights).item() == pytest.approx(0.6 * 0.5 / 6, abs=1e-6)


def test_aitm_loss_in_the_train_wrapper_adds_the_weighted_constraint():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    cfg = _cfg("aitm", dropout=0.0, aitm_constraint_weight=0.6)
    model = build_model(cfg, FIELDS, 3, torch.device("cpu"))
    train = MultiTaskTrain(model).train()
    assert train.head_has_extra_loss and not MultiTaskTrain(build_model(_cfg("mmoe"), FIELDS, 3)).head_has_extra_loss
    batch = _batch(_ids(16, g), _chain_labels(16, 3, g), torch.tensor([1.0] * 12 + [0.0] * 4))
    loss, (per_task, logits, _, _) = train(batch)
    bce, expected_per_task = multitask_bce(logits, batch.labels, batch.weights)
    assert torch.allclose(per_task, expected_per_task)
    assert loss.item() == pytest.approx((bce + 0.6 * label_constraint(logits, batch.weights)).item(), abs=1e-6)


def _set_qkv(att: AttentionTransfer, q, k, v) -> None:
    with torch.no_grad():
        att.q.weight.copy_(torch.tensor(q))
        att.k.weight.copy_(torch.tensor(k))
        att.v.weight.copy_(torch.tensor(v))


def test_aitm_attention_scores_query_dot_key_without_residual():
    head = AITMHead(4, 2, [2], 0.0, 0.6)
    stage = head.stages[0]
    att = stage.attention
    assert att.q.bias is None and att.k.bias is None and att.v.bias is None and not att.residual
    # Q = I, K = diag(1, 3), V = 2 I (symmetric, so x @ W^T = x @ W)
    _set_qkv(att, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [0.0, 2.0]])
    q = torch.tensor([[1.0, 0.0]])  # own representation q_t
    p_prev = torch.tensor([[0.0, 2.0]])  # transferred p_{t-1}
    z, w = att.forward_with_weights(q, p_prev)
    s_q, s_p = 1.0 / math.sqrt(2), 12.0 / math.sqrt(2)  # Q(a)·K(a)/sqrt(d): [1,0]·[1,0] and [0,2]·[0,6]
    w_q = math.exp(s_q) / (math.exp(s_q) + math.exp(s_p))
    assert torch.allclose(w, torch.tensor([[w_q, 1 - w_q]]), atol=1e-6)
    assert torch.allclose(z, torch.tensor([[2.0 * w_q, 4.0 * (1 - w_q)]]), atol=1e-6)  # sum_a w_a V(a), no + q
    # the Q·V bug of public ports: [1,0]·[2,0] and [0,2]·[0,4] give other weights
    s_q_bug, s_p_bug = 2.0 / math.sqrt(2), 8.0 / math.sqrt(2)
    assert abs(w[0, 0].item() - math.exp(s_q_bug) / (math.exp(s_q_bug) + math.exp(s_p_bug))) > 1e-3
    # the stage's logit is read from z
    logit, _, _ = stage(q, p_prev)
    assert torch.allclose(logit, stage.out(z).squeeze(-1))


def test_aitm_transfers_in_chain_order():
    torch.manual_seed(3)
    head = AITMHead(6, 3, [8, 4], 0.0, 0.6)
    x = torch.randn(16, 6)
    logits, weights = head.forward_with_attention(x)
    assert len(weights) == 2 and all(w.shape == (16, 2) for w in weights)
    assert isinstance(head.stages[-1].info, nn.Identity)  # the last task transfers nothing
    # task 0 reads nothing from later tasks; task 2 depends on task 0's tower through the chain
    logits[:, 0].sum().backward()
    assert all(q.grad is None or torch.all(q.grad == 0) for q in head.stages.parameters())
    head.zero_grad(set_to_none=True)
    head(x)[:, 2].sum().backward()
    assert head.towers[0].layers[0].weight.grad.abs().sum() > 0 and head.info0.layers[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- MMoE, PLE: gates


def test_mmoe_gates_sum_to_one():
    torch.manual_seed(4)
    head = MMoEHead(10, 3, 4, [8], [8, 4], 0.0)
    logits, gates = head.forward_with_gates(torch.randn(32, 10) * 5)
    assert logits.shape == (32, 3) and len(gates) == 3
    for gw in gates:
        assert gw.shape == (32, 4) and torch.all(gw >= 0)
        assert torch.allclose(gw.sum(dim=1), torch.ones(32), atol=1e-6)


@pytest.mark.parametrize("levels", [1, 3])
def test_ple_gates_sum_to_one(levels):
    torch.manual_seed(5)
    head = PLEHead(10, 3, levels, 2, 2, [8], [8, 4], 0.0)
    logits, gates = head.forward_with_gates(torch.randn(32, 10) * 5)
    assert logits.shape == (32, 3)
    # per intermediate level: 3 task gates over own 2 + shared 2, and the shared gate over 3 x 2 + 2; last: tasks only
    widths = ([4, 4, 4, 8] * (levels - 1)) + [4, 4, 4]
    assert [gw.shape[1] for gw in gates] == widths
    for gw in gates:
        assert torch.all(gw >= 0) and torch.allclose(gw.sum(dim=1), torch.ones(32), atol=1e-6)
    assert len(head.levels[-1].shared_gate) == 0


# ---------------------------------------------------------------- MNCM: expert-level transfer


def test_mncm_expert_level_transfer_shapes_and_dependence():
    torch.manual_seed(6)
    b, in_dim, m_s, m_t, e, d = 16, 10, 2, 2, 6, 4
    head = MNCMHead(in_dim, 3, m_s, m_t, [e], [8, d], 0.0, 0.6)
    x = torch.randn(b, in_dim)
    logits, experts, w_experts, w_towers = head.forward_with_transfers(x)
    assert logits.shape == (b, 3)
    assert [tuple(t.shape) for t in experts] == [(b, m_t, e)] * 3  # every task's experts after EITM
    assert [tuple(w.shape) for w in w_experts] == [(b, m_t, 2)] * 2  # per expert: over (own, transferred)
    assert [tuple(w.shape) for w in w_towers] == [(b, 2)] * 2
    for w in w_experts + w_towers:
        assert torch.allclose(w.sum(dim=-1), torch.ones(w.shape[:-1]), atol=1e-6)
    assert isinstance(head.stages[-1].expert_info, nn.Identity) and isinstance(head.stages[-1].ait.info, nn.Identity)
    # expert-level transfer: task 1's experts after EITM depend on task 0's experts, task 0's do not on task 1's
    experts[1].sum().backward()
    assert head.experts0.experts[0].layers[0].weight.grad.abs().sum() > 0
    assert head.expert_info0.layers[0].weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)
    _, experts, _, _ = head.forward_with_transfers(x)
    experts[0].sum().backward()
    assert all(q.grad is None for q in head.stages.parameters())
    # with V of the expert attention zeroed, the transferred experts are all that is left (no residual): zero
    with torch.no_grad():
        head.stages[0].expert_attention.v.weight.zero_()
        assert torch.equal(head.forward_with_transfers(x)[1][1], torch.zeros(b, m_t, e))
