"""PIMM head, registry, loss, and the embedding + head model with its training wrapper."""

from types import SimpleNamespace

import pytest
import torch
from torchrec import KeyedJaggedTensor

from pimm_model.config import ModelConfig
from pimm_model.embedding import EmbeddingArch, make_tables, storage_dim
from pimm_model.losses import multitask_bce
from pimm_model.model import MultiTaskModel, MultiTaskTrain, build_model
from pimm_model.models.pimm import PIMMHead
from pimm_model.registry import MODELS, build_head, register_model

FIELDS = [("user", 10), ("item", 7), ("ctx", 5)]


def _labels(b: int, t: int) -> torch.Tensor:
    # sequentially dependent labels: y_{t} = 1 only if y_{t-1} = 1
    y = (torch.rand(b, t) > 0.4).float()
    return torch.cumprod(y, dim=1)


def _kjt(b: int, generator: torch.Generator) -> KeyedJaggedTensor:
    ids = [torch.randint(0, num, (b,), generator=generator) for _, num in FIELDS]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[name for name, _ in FIELDS],
        values=torch.cat(ids),
        lengths=torch.ones(len(FIELDS) * b, dtype=torch.int32),
    )


# ---------------------------------------------------------------- head


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
def test_head_shapes(num_tasks):
    head = PIMMHead(12, num_tasks, [16, 8], 0.1).train()
    x = torch.randn(5, 12)
    assert head(x, _labels(5, num_tasks), 0.5).shape == (5, num_tasks)
    logits, weights = head.forward_with_attention(x)
    assert logits.shape == (5, num_tasks)
    assert len(weights) == num_tasks - 1
    for w in weights:
        assert w.shape == (5, 2)
        assert torch.allclose(w.sum(dim=1), torch.ones(5))
    # no FC after the last task: it would get no gradient
    assert isinstance(head.stages[-1].info, torch.nn.Identity)


def test_head_rejects_single_task():
    with pytest.raises(ValueError):
        PIMMHead(4, 1, [4], 0.0)


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_every_parameter_gets_a_gradient(num_tasks):
    torch.manual_seed(0)
    head = PIMMHead(12, num_tasks, [16, 8], 0.0).train()
    labels = _labels(64, num_tasks)
    logits = head(torch.randn(64, 12), labels, 0.5)
    loss, _ = multitask_bce(logits, labels, torch.ones(64))
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name


def test_later_task_loss_does_not_reach_previous_output_layer():
    # out0 only feeds task 1 through y*, which is truncated: task 1's loss must leave it without gradient
    torch.manual_seed(1)
    head = PIMMHead(6, 2, [8], 0.0).train()
    logits = head(torch.randn(32, 6), _labels(32, 2), 0.0)  # p = 0: y* = predictions
    logits[:, 1].sum().backward()
    assert head.out0.weight.grad is None or torch.all(head.out0.weight.grad == 0)
    # ... while H_0 is not truncated: the implicit path trains task 0's tower and FC
    assert head.info0[0].weight.grad is not None and head.info0[0].weight.grad.abs().sum() > 0


def test_no_nan_with_extreme_inputs():
    torch.manual_seed(2)
    head = PIMMHead(12, 3, [16, 8], 0.0).train()
    for x, labels in [
        (torch.randn(1, 12), torch.zeros(1, 3)),  # batch of one, all-zero labels
        (torch.randn(16, 12) * 1e4, torch.zeros(16, 3)),
        (torch.zeros(16, 12), torch.ones(16, 3)),
    ]:
        for p in (0.0, 0.5, 1.0):
            logits = head(x, labels, p)
            loss, per_task = multitask_bce(logits, labels, torch.ones(x.shape[0]))
            loss.backward()
            assert torch.isfinite(logits).all() and torch.isfinite(per_task).all()
            assert all(torch.isfinite(q.grad).all() for q in head.parameters() if q.grad is not None)
            head.zero_grad()
    assert head.eval()(torch.randn(1, 12)).shape == (1, 3)


def test_train_vs_eval():
    torch.manual_seed(3)
    head = PIMMHead(12, 3, [16, 8], 0.0)
    x = torch.randn(20, 12)
    ones, zeros = torch.ones(20, 3), torch.zeros(20, 3)
    head.train()
    a, b = head(x, ones, 1.0), head(x, zeros, 1.0)
    assert torch.equal(a[:, 0], b[:, 0])  # task 0 has no prior
    assert not torch.allclose(a[:, 1], b[:, 1])  # p = 1: tasks > 0 see the labels
    head.eval()
    e = head(x)
    assert torch.equal(e, head(x))  # deterministic
    assert torch.equal(e, head(x, ones, 1.0))  # labels ignored in eval
    assert torch.equal(e, head(x, torch.full((20, 3), float("nan")), 1.0))


def test_head_scripts_and_matches_eager():
    torch.manual_seed(4)
    head = PIMMHead(12, 3, [16, 8], 0.0).eval()
    scripted = torch.jit.script(head)
    x = torch.randn(7, 12)
    assert torch.allclose(scripted(x, None, 0.0), head(x), atol=1e-6)


# ---------------------------------------------------------------- registry and loss


def test_registry():
    assert "pimm" in MODELS
    head = build_head(ModelConfig(tower_dims=[8, 4]), 10, 2)
    assert isinstance(head, PIMMHead)
    with pytest.raises(KeyError, match="pimm"):
        build_head(ModelConfig(name="nope"), 10, 2)
    with pytest.raises(ValueError, match="already registered"):
        register_model("pimm")(lambda cfg, in_dim, num_tasks: torch.nn.Identity())


def test_multitask_bce_matches_torch():
    torch.manual_seed(5)
    logits, labels = torch.randn(10, 3), _labels(10, 3)
    weights = torch.tensor([1.0] * 8 + [0.0] * 2)  # two padding rows
    total, per_task = multitask_bce(logits, labels, weights)
    expected = torch.stack(
        [torch.nn.functional.binary_cross_entropy_with_logits(logits[:8, t], labels[:8, t]) for t in range(3)]
    )
    assert torch.allclose(per_task, expected, atol=1e-6)
    assert torch.allclose(total, expected.sum(), atol=1e-6)


def test_multitask_bce_fp32_and_zero_weight():
    logits = torch.randn(4, 2, dtype=torch.bfloat16, requires_grad=True)
    total, per_task = multitask_bce(logits, torch.ones(4, 2), torch.zeros(4))
    assert total.dtype == torch.float32 and per_task.dtype == torch.float32
    assert torch.equal(per_task, torch.zeros(2)) and total.item() == 0.0
    total.backward()
    assert torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------- embedding + head


def test_embedding_arch_shape_and_table_order():
    # D = 3 is stored 4 wide (fbgemm's fused kernels need multiples of 4); the model reads the first 3 columns
    tables = make_tables(FIELDS, 3)
    assert [t.embedding_dim for t in tables] == [storage_dim(3)] * 3 == [4, 4, 4]
    arch = EmbeddingArch(tables, device=torch.device("cpu"), dim=3)
    assert arch.out_dim == 9
    g = torch.Generator().manual_seed(0)
    kjt = _kjt(4, g)
    out = arch(kjt)
    assert out.shape == (4, 9)
    # the KJT key order does not matter: outputs follow the table order
    permuted = kjt.permute([2, 0, 1])
    assert torch.equal(arch(permuted), out)
    user_ids = kjt["user"].values()
    assert torch.equal(out[:, :3], arch.ebc.embedding_bags["t_user"].weight[user_ids, :3])


def test_meta_embedding_device():
    model = build_model(ModelConfig(embedding_dim=4, tower_dims=[8]), FIELDS, 2, torch.device("meta"))
    assert model.embedding.ebc.embedding_bags["t_user"].weight.is_meta
    assert all(not q.is_meta for q in model.head.parameters())
    assert model.embedding.out_dim == 12


def test_multitask_model_and_train_step():
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(6)
    model = build_model(ModelConfig(embedding_dim=4, tower_dims=[16, 8]), FIELDS, 3, torch.device("cpu"))
    assert isinstance(model, MultiTaskModel)
    train = MultiTaskTrain(model).train()
    train.set_p(0.5)
    assert train.p == 0.5
    with pytest.raises(ValueError):
        train.set_p(1.5)
    batch = SimpleNamespace(features=_kjt(8, g), labels=_labels(8, 3), weights=torch.ones(8))
    opt = torch.optim.SGD(train.parameters(), lr=0.1)
    loss, (per_task, logits, labels, weights) = train(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert per_task.shape == (3,) and not per_task.requires_grad
    assert logits.shape == (8, 3) and not logits.requires_grad
    assert labels is batch.labels and weights is batch.weights
    loss.backward()
    assert model.embedding.ebc.embedding_bags["t_user"].weight.grad is not None
    assert all(q.grad is not None for q in model.head.parameters())
    opt.step()
    loss2, _ = train(batch)
    assert torch.isfinite(loss2)
