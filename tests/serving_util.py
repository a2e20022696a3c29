"""Shared by the serving tests: a hand-made raw campaign table prepared with every encoding (integer and string
vocabularies with a frequent missing value, rare values -> unknown, integer and string hashing, a string bag with
empty / null bags and null elements), and a trained-like run folder for it built without Ray."""

import json
import os
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from data_pipeline.formats import TableSource
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.reader import ShardReader
from data_pipeline.spec import DatasetSpec
from distributed.checkpoint import save_checkpoint
from launch.config import load_config, to_dict
from launch.worker import EXPORT_REFERENCE_FILE, METRICS_FILE
from pimm_model.model import MultiTaskTrain, build_model

TASKS = ["click", "conversion", "core_conversion"]
FEATURES = ["segment", "fund", "region", "device", "tags"]
HASH = {"region": 16, "device": 8}
SEED = 7


def raw_table(n: int, seed: int, id_start: int = 0) -> pa.Table:
    """n raw rows: customer_id, the FEATURES (raw values as a campaign log holds them) and chained labels."""
    rng = np.random.default_rng(seed)
    segment = [None if rng.random() < 0.2 else ["retail", "private", "sme", "corp"][int(rng.integers(0, 4))]
               for _ in range(n)]
    fund = rng.choice(np.array([-5, 0, 7, 123456789012, 2**62, -(2**63)], np.int64), n).tolist()
    fund = [int(rng.integers(10**6, 10**7)) if rng.random() < 0.1 else f for f in fund]  # rare: unknown
    region = [None if rng.random() < 0.05 else int(rng.integers(-1000, 1000)) for _ in range(n)]
    device = [["ios", "android", "web", "ätm-機"][int(rng.integers(0, 4))] for _ in range(n)]
    tags = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            tags.append(None)  # a null bag: empty
        else:
            k = int(rng.integers(0, 4))
            tags.append([None if rng.random() < 0.05 else f"t{int(rng.integers(0, 9))}" for _ in range(k)])
    click = rng.random(n) < 0.4
    conv = click & (rng.random(n) < 0.5)
    core = conv & (rng.random(n) < 0.5)
    return pa.table({
        "customer_id": pa.array(np.arange(id_start, id_start + n), pa.int64()),
        "segment": pa.array(segment, pa.string()),
        "fund": pa.array(fund, pa.int64()),
        "region": pa.array(region, pa.int32()),
        "device": pa.array(device, pa.string()).dictionary_encode(),
        "tags": pa.array(tags, pa.list_(pa.string())),
        "click": click.astype(np.int8), "conversion": conv.astype(np.int8), "core_conversion": core.astype(np.int8),
    })


def prepared_data(root: str, rows: Dict[str, int] = None) -> Dict[str, str]:
    """Raw train/valid/test Parquet files under root/raw and the prepared dataset root/ds; returns the paths."""
    rows = rows or {"train": 3000, "valid": 500, "test": 1500}
    os.makedirs(os.path.join(root, "raw"), exist_ok=True)
    paths = {}
    start = 0
    for i, (split, n) in enumerate(rows.items()):
        paths[split] = os.path.join(root, "raw", f"{split}.parquet")
        pq.write_table(raw_table(n, seed=100 + i, id_start=start), paths[split], row_group_size=400)
        start += n
    out = os.path.join(root, "ds")
    prepare(TableSource(paths, labels=TASKS, features=FEATURES), out,
            PrepareConfig(min_count=2, hash_buckets=dict(HASH), seed=SEED, progress=False, rows_per_file=600,
                          row_group_rows=200))
    return {**paths, "data": out}


def fake_run(data: str, run_dir: str, model: str = "pimm", overrides: List[str] = ()) -> str:
    """A run folder as the trainer leaves it (config.yaml, one DCP checkpoint, metrics.json, export_reference.pt),
    for a model with random weights: export_run's input, without Ray."""
    cfg = load_config(None, [f"data.path={data}", f"model.name={model}", "model.embedding_dim=5",
                             "model.tower_dims=[16,8]", "model.expert_dims=[16]", f"run.dir={run_dir}",
                             *overrides])
    spec = DatasetSpec.load(data)
    torch.manual_seed(0)
    net = build_model(cfg.model, [(f.name, f.num_embeddings) for f in spec.fields], len(spec.labels),
                      embedding_device=torch.device("cpu"), weighted=spec.weighted)
    with torch.no_grad():  # move the weights off their init, tables included
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    train = MultiTaskTrain(net)
    os.makedirs(run_dir, exist_ok=True)
    ckpt = os.path.join(run_dir, "epoch_000")
    save_checkpoint(ckpt, train, torch.optim.SGD(train.parameters(), lr=0.1), {"epoch": 0})
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    reader = ShardReader(spec, spec.files("test"), 256)
    batch = next(iter(reader.iter_eval(1)))
    net.eval()
    with torch.no_grad():
        probs = torch.sigmoid(net(batch.features))
    ref = {"values": batch.features.values(), "lengths": batch.features.lengths(),
           "keys": list(batch.features.keys()), "probs": probs, "keep": batch.weights > 0}
    if spec.weighted:
        ref["weights"] = batch.features.weights()
    torch.save(ref, os.path.join(run_dir, EXPORT_REFERENCE_FILE))
    metrics = {"tasks": spec.labels, "best_epoch": 0, "best_checkpoint": ckpt, "world_size": 1,
               "early_stop_metric": "final_auc", "test": {"auc": {t: 0.5 for t in spec.labels}},
               "epochs": [{"epoch": 0, "valid": {"auc": {t: 0.5 for t in spec.labels}}}]}
    with open(os.path.join(run_dir, METRICS_FILE), "w") as f:
        json.dump(metrics, f)
    return run_dir


def eager_probs(run_dir: str, split: str = "test") -> np.ndarray:
    """(N, T) probabilities of the run's checkpoint, eager torchrec model, over the prepared ``split`` in order."""
    from distributed.checkpoint import load_unsharded
    from launch.config import config_from_dict

    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    spec = DatasetSpec.load(cfg.data.path)
    train = MultiTaskTrain(build_model(cfg.model, [(f.name, f.num_embeddings) for f in spec.fields],
                                       len(spec.labels), embedding_device=torch.device("cpu"),
                                       weighted=spec.weighted))
    load_unsharded(os.path.join(run_dir, "epoch_000"), train)
    net = train.model.eval()
    reader = ShardReader(spec, spec.files(split), 512)
    out = []
    with torch.no_grad():
        for b in reader.iter_eval(reader.num_padded_batches()):
            out.append(torch.sigmoid(net(b.features))[b.weights > 0].numpy())
    return np.concatenate(out)
