"""Two real gloo processes: a table of at least `split_min_bytes` is cut into one column-wise shard per rank (TorchRec
alone keeps a D <= 128 table in one shard, whole on one rank), trains with the fused update on both ranks, and its
DCP checkpoint reassembles into the unsharded table that gives the sharded model's outputs."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from distributed.checkpoint import load_unsharded, save_checkpoint
from distributed.optim import apply_sparse_optimizer, build_optimizer
from distributed.sharding import column_shard_width, describe_plan, shard_model, table_sharding_types
from tests.ray_cluster import free_port

ROWS = {"big": 3000, "mid": 2000, "small": 10}  # x D=8 floats: 96 kB, 64 kB, 320 B
DIM = 8
SPLIT_MIN_BYTES = 90_000  # only "big" is split; "mid" is sharded as the planner likes; "small" replicated


class _Net(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f],
                                     pooling=PoolingType.SUM) for f, n in ROWS.items()]
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.lin = torch.nn.Linear(DIM * len(ROWS), 1)

    def forward(self, kjt):
        pooled = self.ebc(kjt).to_dict()
        return self.lin(torch.cat([pooled[f] for f in ROWS], dim=1))


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    b = 6
    values = torch.cat([torch.randint(0, n, (b,), generator=g) for n in ROWS.values()])
    return KeyedJaggedTensor(keys=list(ROWS), values=values, lengths=torch.ones(b * len(ROWS), dtype=torch.int64))


def _worker(rank, world, port, ckpt, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run(rank, world, ckpt, out)
        # the sharded model, DDP and the optimizers are gone by now; collect them (and stop their C++ threads)
        # while the process group still exists: otherwise about 1 run in 5 aborted at exit with "terminate
        # called without an active exception"
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(rank, world, ckpt, out):
    torch.manual_seed(0)
    net = _Net(torch.device("meta"))
    _, kwargs = apply_sparse_optimizer(net.ebc, "rowwise_adagrad", 0.1, 0.0)
    dmp = shard_model(net, torch.device("cpu"), [], world, world, replicate_max_bytes=1000,
                      split_min_bytes=SPLIT_MIN_BYTES)
    opt = build_optimizer(dmp, 0.01, 0.0, "rowwise_adagrad", kwargs)
    big = dmp.state_dict()["ebc.embedding_bags.t_big.weight"]
    local_shapes = [tuple(s.tensor.shape) for s in big.local_shards()]
    before = [s.tensor.clone() for s in big.local_shards()]
    dmp(_batch(rank)).sum().backward()
    opt.step()
    moved = [bool((s.tensor != b).any()) for s, b in zip(big.local_shards(), before)]
    save_checkpoint(ckpt, dmp, opt, {"epoch": 0})
    with torch.no_grad():
        after = dmp(_batch(rank))
    torch.save({"plan": describe_plan(dmp), "local_shapes": local_shapes, "moved": moved, "out": after},
               out.format(rank))


def test_big_table_is_split_over_both_ranks_and_round_trips(tmp_path):
    ckpt, out = str(tmp_path / "epoch_000"), str(tmp_path / "rank{}.pt")
    mp.spawn(_worker, args=(2, free_port(), ckpt, out), nprocs=2)
    r = [torch.load(out.format(k), weights_only=False) for k in range(2)]
    assert r[0]["plan"] == r[1]["plan"]
    assert r[0]["plan"]["t_big"] == "column_wise@[0, 1]"
    assert r[0]["plan"]["t_small"] == "data_parallel@[0, 1]"
    # each rank holds half the columns of every row, and its half was trained (the fused update ran on both)
    assert r[0]["local_shapes"] == r[1]["local_shapes"] == [(ROWS["big"], DIM // 2)]
    assert r[0]["moved"] == r[1]["moved"] == [True]
    # the checkpoint's shards reassemble into one plain model that scores each rank's batch as the sharded one did
    plain = _Net(torch.device("cpu"))
    load_unsharded(ckpt, plain)
    with torch.no_grad():
        for k in range(2):
            torch.testing.assert_close(plain(_batch(k)), r[k]["out"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim, world, want", [(16, 2, 8), (8, 2, 4), (4, 2, 4), (16, 4, 4), (12, 2, 4),
                                              (24, 2, 12), (16, 3, 4), (128, 8, 16), (20, 2, 4), (6, 2, 6)])
def test_column_shard_width(dim, world, want):
    # the widest multiple of 4 dividing dim with at least `world` shards (never narrower than 4)
    assert column_shard_width(dim, world) == want


def test_split_tables_may_only_use_splitting_types():
    got = table_sharding_types(_Net(torch.device("meta")), torch.device("cpu"), [], 1000, SPLIT_MIN_BYTES)
    assert got == {"t_big": ["column_wise"], "t_mid": ["table_wise", "column_wise"], "t_small": ["data_parallel"]}
    # a user who allows only whole-table types keeps them (nothing to split with)
    only_tw = table_sharding_types(_Net(torch.device("meta")), torch.device("cpu"), ["table_wise"], 0,
                                   SPLIT_MIN_BYTES)
    assert only_tw["t_big"] == ["table_wise"]
