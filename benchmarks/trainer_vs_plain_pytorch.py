"""Benchmark 2: the full trainer vs a plain single-process PyTorch trainer as the common MTL libraries write it
(issue #6; targets: trainer >= 3x variant (a) and >= 1.5x variant (b) in samples/s).

    python benchmarks/trainer_vs_plain_pytorch.py                 # trainer, a, a_dict, b; 3 interleaved reps, ~3 min
    python benchmarks/trainer_vs_plain_pytorch.py --variants b --rows 8000 --reps 1   # no Ray (smoke test)

The plain trainer: one process, torch.set_num_threads(--threads, default 2), one ``nn.Embedding(cardinality, D)`` per
field, the field embeddings concatenated into the SAME PIMM head (``pimm_model.registry.build_head``, the default
config's towers) and the same loss (``multitask_bce``), ``torch.optim.Adam`` (lr 1e-3) on every parameter, tables
included (dense gradients, as nn.Embedding's default). Same math as the trainer's model: a sum-pooled bag of one id
is a lookup. Same data: the train split's Parquet files, read once with pyarrow before the timed loop.

  a       per-row ``Dataset`` over numpy arrays (``__getitem__`` returns the row's (F,) ids and (T,) labels, as
          MTReclib's datasets do) + ``DataLoader(batch_size, shuffle=True)`` with the default collate, num_workers=0
  a_dict  the same, ``__getitem__`` returning ({field: id}, labels) per row (torch-rechub's style); slower
  b       batches pre-built as in-memory tensors (one random permutation, then slices): the plain trainer's best case

The plain batch is the trainer's global batch (workers x per-worker batch), the rows of one optimizer step of the
trainer. The trainer is `launch/train.py` with --workers Ray workers; its rate is metrics.json's per-epoch training
samples/s (evaluation excluded), median over the epochs after the first. Each repetition runs every variant once.
Noise only slows a run down, so the verdict compares best-of-N with best-of-N; medians and paired (per-repetition)
ratios are printed too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402

TARGETS = {"a": 3.0, "b": 1.5}


def load_arrays(spec):
    """The train split as numpy arrays: ids (N, F) int64 and labels (N, T) float32 (read once, untimed)."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(spec.files("train"), columns=spec.field_names + list(spec.labels))
    ids = np.stack([table.column(f).to_numpy().astype(np.int64) for f in spec.field_names], axis=1)
    labels = np.stack([table.column(t).to_numpy().astype(np.float32) for t in spec.labels], axis=1)
    return ids, labels


def build_plain(model_cfg, spec, lr: float, seed: int = 0):
    import torch
    from torch import nn

    from pimm_model.registry import build_head

    class PlainMTL(nn.Module):
        """nn.Embedding per field -> concat -> the PIMM head."""

        def __init__(self) -> None:
            super().__init__()
            d = model_cfg.embedding_dim
            self.embeddings = nn.ModuleList([nn.Embedding(int(f.num_embeddings), d) for f in spec.fields])
            self.head = build_head(model_cfg, d * len(spec.fields), len(spec.labels))

        def forward(self, ids, labels, p: float = 0.5):  # ids (B, F) int64, labels (B, T)
            x = torch.cat([emb(ids[:, i]) for i, emb in enumerate(self.embeddings)], dim=1)  # (B, F*D)
            return self.head(x, labels, p)  # (B, T)

    torch.manual_seed(seed)
    model = PlainMTL()
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def make_loader(kind: str, ids, labels, batch_size: int, fields):
    import torch
    from torch.utils.data import DataLoader, Dataset

    class RowDataset(Dataset):  # MTReclib style: one row as arrays
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return ids[i], labels[i]

    class DictRowDataset(Dataset):  # torch-rechub style: a dict of per-field scalars
        def __init__(self):
            self.x = {f: ids[:, j] for j, f in enumerate(fields)}

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {f: v[i] for f, v in self.x.items()}, labels[i]

    if kind == "a":
        return DataLoader(RowDataset(), batch_size=batch_size, shuffle=True, drop_last=True)
    if kind == "a_dict":
        loader = DataLoader(DictRowDataset(), batch_size=batch_size, shuffle=True, drop_last=True)
        return ((torch.stack([x[f] for f in fields], dim=1), y) for x, y in loader)
    raise ValueError(kind)


def plain_rate(kind: str, model, opt, ids, labels, batch_size: int, steps: int, fields, warmup: int = 2) -> float:
    """samples/s of the plain loop over ``steps`` batches (after ``warmup``), data loading included."""
    import torch

    from pimm_model.losses import multitask_bce

    if kind == "b":
        t_ids, t_labels = torch.from_numpy(ids), torch.from_numpy(labels)
        perm = torch.randperm(len(t_labels))
        nb = len(perm) // batch_size
        idx = [perm[i * batch_size:(i + 1) * batch_size] for i in range(min(nb, steps + warmup))]
        batches = [(t_ids[j], t_labels[j]) for j in idx]  # pre-built before timing: the best case
        it = iter(batches)
    else:
        it = iter(make_loader(kind, ids, labels, batch_size, fields))
    model.train()
    elapsed, rows = None, 0
    for i, (x, y) in enumerate(it):
        if i == warmup:
            elapsed, rows = C.timer(), 0
        if i >= steps + warmup:
            break
        x, y = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32)
        opt.zero_grad()
        logits = model(x, y)
        loss, _ = multitask_bce(logits, y, torch.ones(len(y)))
        loss.backward()
        opt.step()
        rows += len(y)
    if elapsed is None or rows == 0:
        raise ValueError(f"not enough rows for {warmup + 1} batches of {batch_size}")
    return rows / max(elapsed(), 1e-9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(ap, rows=200_000)
    C.add_trainer_args(ap, epochs=4)
    ap.add_argument("--variants", default="trainer,a,a_dict,b",
                    help="which to run: trainer, a, a_dict, b (comma-separated; default all)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-worker batch of the trainer (default: config)")
    ap.add_argument("--plain-batch", type=int, default=None, help="plain batch (default: workers x per-worker batch)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the plain trainer (default 2)")
    ap.add_argument("--steps", type=int, default=40, help="timed plain steps per measurement (default 40)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)



    variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(variants) - {"trainer", "a", "a_dict", "b"})
    if bad:
        ap.error(f"unknown variants {bad}")
    data, spec, cfg, per_worker, env = C.bench_setup(args, args.threads)
    plain_batch = args.plain_batch or per_worker * args.workers
    print(f"# data {data}: {spec.rows['train']:,} train rows; model {cfg.model.name} D={cfg.model.embedding_dim} "
          f"towers {cfg.model.tower_dims}; trainer {args.workers} workers x {per_worker}; plain batch {plain_batch}, "
          f"{args.threads} threads", flush=True)
    ids, labels = load_arrays(spec)
    steps = min(args.steps, len(labels) // plain_batch - 2)
    if steps < 1:
        ap.error(f"--rows too small for batches of {plain_batch}")
    plain = {v: build_plain(cfg.model, spec, cfg.train.lr) for v in variants if v != "trainer"}
    for v, (model, opt) in plain.items():  # untimed warm-up pass
        plain_rate(v, model, opt, ids, labels, plain_batch, 2, spec.field_names, warmup=1)

    rates = {v: [] for v in variants}
    trainer_runs = []
    for rep in range(args.reps):
        for v in variants:
            if v == "trainer":
                run = C.run_trainer(data, C.trainer_overrides(per_worker, args.workers, args.epochs, args.trainer_arg))
                trainer_runs.append(run)
                rates[v].append(run["samples_per_s"])
            else:
                rates[v].append(plain_rate(v, *plain[v], ids, labels, plain_batch, steps, spec.field_names))
        print(f"# rep {rep + 1}/{args.reps}: samples/s " + " ".join(f"{v}={rates[v][-1]:,.0f}" for v in variants),
              flush=True)

    med = {v: C.median(r) for v, r in rates.items()}
    names = {"trainer": f"FULL TRAINER ({args.workers} Ray workers, B={per_worker}/worker)",
             "a": f"plain (a) per-row Dataset (arrays) + DataLoader, B={plain_batch}",
             "a_dict": f"plain (a) per-row Dataset (dict/field) + DataLoader, B={plain_batch}",
             "b": f"plain (b) pre-built tensors, B={plain_batch}"}
    rows = []
    for v in variants:
        row = {"variant": names[v], "samples/s (median)": med[v], "best": max(rates[v]),
               "min..max": C.spread(rates[v])}
        if "trainer" in rates:
            row["trainer / this"] = med["trainer"] / med[v]
            row["paired ratio (median)"] = C.median([t / r for t, r in zip(rates["trainer"], rates[v])])
        rows.append(row)
    C.print_table(rows, title="trainer vs plain single-process PyTorch (training samples/s)")
    results = {"rates": rates, "medians": med, "plain_batch": plain_batch, "per_worker_batch": per_worker,
               "threads": args.threads, "steps": steps, "trainer_runs": trainer_runs, "verdicts": {}}
    if "trainer" in rates:
        for key, target in TARGETS.items():
            cands = [v for v in variants if v == key or v.startswith(key + "_")]
            if not cands:
                continue
            ref = max(cands, key=lambda v: max(rates[v]))  # the faster plain form is the one to beat
            ratio = med["trainer"] / med[ref]
            paired = C.median([t / r for t, r in zip(rates["trainer"], rates[ref])])
            best = max(rates["trainer"]) / max(rates[ref])
            verdict = "MET" if best >= target else f"MISSED ({best / target:.0%} of the target)"
            print(f"trainer / plain ({key}, fastest form: {ref}): best-of-{args.reps} {best:.2f} (the verdict), "
                  f"medians {ratio:.2f}, paired {paired:.2f}; target >= {target}: {verdict}")
            results["verdicts"][key] = {"vs": ref, "ratio_medians": ratio, "paired": paired, "best_of_n": best,
                                        "target": target, "met": best >= target}
    load = C.print_load_end(env)
    C.write_json(args.json, "trainer_vs_plain_pytorch", args, env, load, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
