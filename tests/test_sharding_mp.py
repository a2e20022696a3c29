"""Two real gloo processes: small tables are replicated (data_parallel) and updated by the sparse optimizer's torch
counterpart with its own lr, identically on every rank; large tables are sharded with the fused in-backward update."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from distributed.optim import apply_sparse_optimizer, build_optimizer
from distributed.sharding import describe_plan, shard_model, table_sharding_types
from tests.ray_cluster import free_port

SIZES = {"small": 50, "large": 5000, "tiny": 6}
SPARSE_LR, DENSE_LR = 0.1, 0.01


class _Net(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=n, feature_names=[f],
                                     pooling=PoolingType.SUM) for f, n in SIZES.items()]
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.lin = torch.nn.Linear(4 * len(SIZES), 1)

    def forward(self, kjt):
        pooled = self.ebc(kjt).to_dict()
        return self.lin(torch.cat([pooled[f] for f in SIZES], dim=1))


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run(rank, world, out)
        # the sharded model, DDP and the optimizers are gone by now; collect them (and stop their C++ threads)
        # while the process group still exists: otherwise about 1 run in 5 aborted at exit with "terminate
        # called without an active exception"
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(rank, world, out):
    torch.manual_seed(0)
    net = _Net(torch.device("meta"))
    _, kwargs = apply_sparse_optimizer(net.ebc, "rowwise_adagrad", SPARSE_LR, 0.0)
    dmp = shard_model(net, torch.device("cpu"), [], world, world, replicate_max_bytes=1000)
    opt = build_optimizer(dmp, DENSE_LR, 0.0, "rowwise_adagrad", kwargs)
    replicated = "ebc.embedding_bags.t_small.weight"  # a plain tensor on every rank (sharded ones are not saved)
    before = dmp.state_dict()[replicated].clone()
    # rank 0 looks up small ids 1, 2; rank 1 small id 3: each rank touches rows the other does not
    values = torch.tensor([1, 2, 7, 4]) if rank == 0 else torch.tensor([3, 8, 5])
    lengths = torch.tensor([2, 1, 1]) if rank == 0 else torch.tensor([1, 1, 1])
    dmp(KeyedJaggedTensor(keys=list(SIZES), values=values, lengths=lengths)).sum().backward()
    opt.step()
    after = dmp.state_dict()[replicated].clone()
    torch.save({"plan": describe_plan(dmp), "before": before, "after": after,
                "groups": sorted({k.split(".")[0] for k in opt.state_dict()["state"]}),
                "fused": [g.get("fused") for name, o in opt.optimizers if name != "sparse"
                          for g in o.param_groups]}, out.format(rank))


def test_small_tables_are_replicated_and_follow_the_sparse_rule(tmp_path):
    out = str(tmp_path / "rank{}.pt")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2)
    r0, r1 = (torch.load(out.format(r), weights_only=False) for r in range(2))
    assert r0["plan"] == r1["plan"]
    assert r0["plan"]["t_small"] == r0["plan"]["t_tiny"] == "data_parallel@[0, 1]"
    assert not r0["plan"]["t_large"].startswith("data_parallel")
    assert "replicated" in r0["groups"]
    assert r0["fused"] == [True, True]  # dense Adam and the replicated tables' Adagrad: torch's fused CPU kernels
    # identical on both ranks after the step (DDP averaged the gradient), and exactly Adagrad's first step with the
    # sparse lr: every touched row by lr * sign(grad), every other row unchanged
    torch.testing.assert_close(r0["after"], r1["after"], rtol=0, atol=0)
    torch.testing.assert_close(r0["before"], r1["before"], rtol=0, atol=0)
    delta = r0["after"] - r0["before"]
    moved = sorted(torch.nonzero(delta.abs().sum(dim=1)).flatten().tolist())
    assert moved == [1, 2, 3]
    torch.testing.assert_close(delta[moved].abs(), torch.full((3, 4), SPARSE_LR), atol=1e-6, rtol=0)


@pytest.mark.parametrize("types, max_bytes, want", [  # tables of 6, 50, 5000 rows x 4 floats: 96 B, 800 B, 80 kB
    ([], 0, {"t_small": ["table_wise", "column_wise"]}),
    ([], 800, {"t_small": ["data_parallel"], "t_large": ["table_wise", "column_wise"]}),
    (["column_wise"], 799, {"t_tiny": ["data_parallel"], "t_small": ["column_wise"]}),
])
def test_table_sharding_types_by_size(types, max_bytes, want):
    got = table_sharding_types(_Net(torch.device("meta")), torch.device("cpu"), types, max_bytes)
    assert {k: got[k] for k in want} == want
