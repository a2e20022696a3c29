"""Synthetic campaign logs with sequentially dependent targets (click -> conversion -> core_conversion).

Generative model, for a row with id v_f in every field f and tasks t = 0..T-1:

    logit_t = b_t + shared_effect * sum_f s_f[v_f] + task_effect * sum_f e_{f,t}[v_f]
              + interaction * sum_{(f,g) in pairs} <u_f[v_f], u_g[v_g]> / sqrt(#pairs)
    q_t = sigmoid(logit_t)                      # P(y_t = 1 | y_{t-1} = 1)
    y_0 ~ Bern(q_0),  y_t = y_{t-1} * Bern(q_t)  # the chain: y_t = 1 only if y_{t-1} = 1

The shared effects make multi-task learning help, the task effects make the tasks differ, and the rank-4 pairwise
interaction gives deep models something a per-id (linear) model misses. Per-id effects are N(0, 1/num_fields) so the
summed logit is O(1) whatever the number of fields. b_t is calibrated by bisection on a fixed sample so the
conditional positive rate is about base_rates[t]. ``oracle_<task>`` columns hold the true marginal
P(y_t = 1) = prod_{s<=t} q_s, so the best achievable AUC can be reported next to a model's.

Ids follow a Zipf-like popularity (probability of rank r proportional to 1/(r+1)^zipf_a) with a random id per rank.
Everything is drawn from ``cfg.seed``; every row group has its own seed (seed, split, chunk), so the same config
always gives byte-identical files. Rows are generated and written one row group at a time: memory does not grow with
the number of rows (apart from the oracle-AUC sample, capped at AUC_MAX_ROWS rows per split).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.spec import SPEC_FILE, DatasetSpec, FieldSpec

# Bump when the generated data changes for the same config, so ensure_dataset's cache keys change with it.
GENERATOR_VERSION = 1
SPLITS = ("train", "valid", "test")
INTERACTION_RANK = 4
MAX_INTERACTION_PAIRS = 4
CALIBRATION_ROWS = 100_000
AUC_MAX_ROWS = 2_000_000  # oracle AUC uses at most the first this-many rows of a split (bounded memory)


def _default_fields() -> Dict[str, int]:
    return {
        "customer": 20000,
        "fund": 300,
        "campaign": 50,
        "channel": 8,
        "risk_level": 5,
        "asset_tier": 6,
        "hour": 24,
        "age_band": 8,
        "city": 300,
        "device": 4,
    }


@dataclass
class SyntheticConfig:
    tasks: List[str] = field(default_factory=lambda: ["click", "conversion", "core_conversion"])  # chain order
    fields: Dict[str, int] = field(default_factory=_default_fields)  # name -> cardinality
    rows_train: int = 200_000
    rows_valid: int = 20_000
    rows_test: int = 40_000
    rows_per_file: int = 10_000  # several shard files per split, so several workers each get some
    row_group_rows: int = 5_000
    zipf_a: float = 1.1
    base_rates: List[float] = field(default_factory=lambda: [0.15, 0.3, 0.4])  # conditional rates; last repeats
    shared_effect: float = 1.0
    task_effect: float = 0.5
    interaction: float = 0.5
    seed: int = 0

    def rows(self) -> Dict[str, int]:
        return {"train": self.rows_train, "valid": self.rows_valid, "test": self.rows_test}

    def rates(self) -> List[float]:
        r = list(self.base_rates)
        return (r + [r[-1]] * len(self.tasks))[: len(self.tasks)]

    def validate(self) -> None:
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be >= 2 distinct names, got {self.tasks}")
        if not self.fields or any(int(c) < 1 for c in self.fields.values()):
            raise ValueError(f"fields must be a non-empty name -> cardinality (>= 1) map, got {self.fields}")
        if set(self.fields) & set(self.tasks):
            raise ValueError(f"field and task names overlap: {sorted(set(self.fields) & set(self.tasks))}")
        if not self.base_rates or not all(0.0 < r < 1.0 for r in self.base_rates):
            raise ValueError(f"base_rates must lie in (0, 1), got {self.base_rates}")
        if self.rows_train < 1 or self.rows_valid < 0 or self.rows_test < 0:
            raise ValueError("rows_train must be >= 1 and rows_valid/rows_test >= 0")
        if self.rows_per_file < 1 or self.row_group_rows < 1:
            raise ValueError("rows_per_file and row_group_rows must be >= 1")


@dataclass
class _Model:
    """Drawn parameters. cdf[f]: (C_f,) rank CDF; rank_to_id[f]: (C_f,); table[f]: (C_f, T) summed per-id logit
    contributions (shared + task); emb[f]: (C_f, R) interaction factors; bias: (T,)."""

    cdf: List[np.ndarray]
    rank_to_id: List[np.ndarray]
    table: List[np.ndarray]
    emb: List[np.ndarray]
    pairs: List[Tuple[int, int]]
    bias: np.ndarray


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _draw_model(cfg: SyntheticConfig) -> _Model:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xC0FFEE]))
    cards = list(cfg.fields.values())
    nf, nt = len(cards), len(cfg.tasks)
    scale = 1.0 / np.sqrt(nf)
    cdf, rank_to_id, table, emb = [], [], [], []
    for c in cards:
        p = 1.0 / np.arange(1, c + 1, dtype=np.float64) ** cfg.zipf_a
        cdf.append(np.cumsum(p) / p.sum())
        rank_to_id.append(rng.permutation(c).astype(np.int64))
        shared = rng.normal(0.0, scale, size=(c, 1))
        task = rng.normal(0.0, scale, size=(c, nt))
        table.append(cfg.shared_effect * shared + cfg.task_effect * task)
        # entries with std R^-1/2 make each <u_f, u_g> of variance ~1
        emb.append(rng.normal(0.0, INTERACTION_RANK**-0.5, size=(c, INTERACTION_RANK)))
    all_pairs = [(i, j) for i in range(nf) for j in range(i + 1, nf)]
    k = min(MAX_INTERACTION_PAIRS, len(all_pairs))
    pairs = [all_pairs[i] for i in sorted(rng.choice(len(all_pairs), size=k, replace=False))] if k else []
    model = _Model(cdf, rank_to_id, table, emb, pairs, np.zeros(nt))
    model.bias = _calibrate(cfg, model)
    return model


def _draw_ids(model: _Model, rng: np.random.Generator, n: int) -> List[np.ndarray]:
    """Per field an (n,) int64 array of ids, Zipf-like by rank."""
    out = []
    for cdf, r2i in zip(model.cdf, model.rank_to_id):
        rank = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)
        out.append(r2i[rank])
    return out


def _logits_no_bias(cfg: SyntheticConfig, model: _Model, ids: List[np.ndarray]) -> np.ndarray:
    """(n, T) logits without the per-task bias."""
    z = np.zeros((len(ids[0]), len(cfg.tasks)))
    for tab, v in zip(model.table, ids):
        z += tab[v]
    if model.pairs:
        inter = sum(np.einsum("nr,nr->n", model.emb[f][ids[f]], model.emb[g][ids[g]]) for f, g in model.pairs)
        z += (cfg.interaction / np.sqrt(len(model.pairs))) * inter[:, None]
    return z


def _calibrate(cfg: SyntheticConfig, model: _Model) -> np.ndarray:
    """(T,) biases so that E[q_t | y_{t-1}=1] = rate_t on a fixed sample. Uses expectations, not sampled labels:
    P(y_t=1 | y_{t-1}=1) = E[w q_t] / E[w] with w = prod_{s<t} q_s, which is monotone in b_t (bisection)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xCA11B]))
    z = _logits_no_bias(cfg, model, _draw_ids(model, rng, CALIBRATION_ROWS))
    w = np.ones(len(z))
    bias = np.zeros(len(cfg.tasks))
    for t, rate in enumerate(cfg.rates()):
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if np.dot(w, _sigmoid(z[:, t] + mid)) / w.sum() < rate:
                lo = mid
            else:
                hi = mid
        bias[t] = 0.5 * (lo + hi)
        w = w * _sigmoid(z[:, t] + bias[t])
    return bias


def _make_chunk(cfg: SyntheticConfig, model: _Model, split_idx: int, chunk_idx: int, n: int) -> pa.Table:
    """One row group of n rows: feature columns (int64), label columns (int8), oracle_<task> columns (float32)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, split_idx, chunk_idx]))
    ids = _draw_ids(model, rng, n)
    q = _sigmoid(_logits_no_bias(cfg, model, ids) + model.bias)  # (n, T) conditional probabilities
    # chain: y_t = y_{t-1} * Bern(q_t); cumprod over tasks implements both the chain and the marginal
    y = np.cumprod(rng.random(q.shape) < q, axis=1).astype(np.int8)
    marginal = np.cumprod(q, axis=1).astype(np.float32)
    cols = {name: v for name, v in zip(cfg.fields, ids)}
    cols.update({task: y[:, t] for t, task in enumerate(cfg.tasks)})
    cols.update({f"oracle_{task}": np.ascontiguousarray(marginal[:, t]) for t, task in enumerate(cfg.tasks)})
    return pa.table(cols)


def _write_row_group(writer: pq.ParquetWriter, table: pa.Table) -> None:
    # each call writes exactly one row group (separate function so tests can inject a failure mid-way)
    writer.write_table(table, row_group_size=table.num_rows)


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC from ranks (ties get their average rank). labels: (n,) 0/1; scores: (n,). NaN if one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    npos = int(labels.sum())
    nneg = len(labels) - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    pos_rank_sum = avg_rank[inv][labels].sum()
    return float((pos_rank_sum - npos * (npos + 1) / 2.0) / (npos * nneg))


def generate(cfg: SyntheticConfig, out_dir: str, progress: bool = True) -> DatasetSpec:
    """Write a dataset to ``out_dir`` (must not exist, or be empty) and return its spec.

    Layout: out_dir/{train,valid,test}/part-NNNNN.parquet, row groups of cfg.row_group_rows rows (a file's last one may
    be shorter), plus spec.json. Everything is written into a hidden sibling folder renamed to out_dir at the end, so
    an interrupted run never leaves a folder that looks complete. Splits with 0 rows are left out.
    """
    cfg.validate()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or pick another out_dir")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        spec = _generate_into(cfg, tmp, progress)
        try:
            os.replace(tmp, out_dir)  # atomic on one filesystem; fails if another process got there first
        except OSError as e:
            raise FileExistsError(f"{out_dir} appeared while generating (another process?): {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    spec.root = out_dir
    return spec


def _write_split(
    cfg: SyntheticConfig, model: _Model, root: str, split_idx: int, split: str, n_rows: int, bar
) -> Tuple[List[str], Dict[str, float], Dict[str, float]]:
    """Write one split's shards; return (relative paths, oracle AUC per task, marginal positive rate per task)."""
    os.makedirs(os.path.join(root, split))
    schema = _make_chunk(cfg, model, 0, 0, 1).schema
    files: List[str] = []
    # for the AUC keep only labels and oracle scores (int8 + float32 per task) of the first AUC_MAX_ROWS rows
    ys, scores, kept = [], [], 0
    positives = np.zeros(len(cfg.tasks), dtype=np.int64)
    done, chunk_idx = 0, 0
    while done < n_rows:
        rel = f"{split}/part-{len(files):05d}.parquet"
        file_rows = min(cfg.rows_per_file, n_rows - done)
        with pq.ParquetWriter(os.path.join(root, rel), schema) as writer:
            for start in range(0, file_rows, cfg.row_group_rows):
                n = min(cfg.row_group_rows, file_rows - start)
                table = _make_chunk(cfg, model, split_idx, chunk_idx, n)
                _write_row_group(writer, table)
                y = np.stack([table.column(t).to_numpy() for t in cfg.tasks], axis=1)  # (n, T) int8
                positives += y.sum(axis=0)
                take = min(n, AUC_MAX_ROWS - kept)
                if take > 0:
                    ys.append(y[:take])
                    scores.append(np.stack([table.column(f"oracle_{t}").to_numpy()[:take] for t in cfg.tasks], 1))
                    kept += take
                chunk_idx += 1
                bar.update(n)
        files.append(rel)
        done += file_rows
    y_all, s_all = np.concatenate(ys), np.concatenate(scores)
    auc = {t: rank_auc(y_all[:, i], s_all[:, i]) for i, t in enumerate(cfg.tasks)}
    rate = {t: float(positives[i]) / n_rows for i, t in enumerate(cfg.tasks)}
    return files, auc, rate


def _generate_into(cfg: SyntheticConfig, root: str, progress: bool) -> DatasetSpec:
    from tqdm import tqdm

    model = _draw_model(cfg)
    rows = {s: n for s, n in cfg.rows().items() if n > 0}
    splits: Dict[str, List[str]] = {}
    oracle_auc: Dict[str, Dict[str, float]] = {}
    label_rate: Dict[str, Dict[str, float]] = {}
    bar = tqdm(
        total=sum(rows.values()),
        unit="rows",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
        desc="synthetic data",
    )
    with bar:
        for split_idx, split in enumerate(SPLITS):
            if split in rows:
                splits[split], oracle_auc[split], label_rate[split] = _write_split(
                    cfg, model, root, split_idx, split, rows[split], bar
                )
    spec = DatasetSpec(
        fields=[FieldSpec(name, int(card)) for name, card in cfg.fields.items()],
        labels=list(cfg.tasks),
        splits=splits,
        rows=rows,
        meta={
            "generator": "data_pipeline.synthetic",
            "generator_version": GENERATOR_VERSION,
            "config": asdict(cfg),
            "bias": [float(b) for b in model.bias],
            "interaction_pairs": [[list(cfg.fields)[f], list(cfg.fields)[g]] for f, g in model.pairs],
            "oracle_columns": [f"oracle_{t}" for t in cfg.tasks],
            "oracle_auc": oracle_auc,
            "oracle_auc_note": f"rank AUC of oracle_<task> (true marginal P(y_t=1)) vs y_t over the first "
            f"min(rows, {AUC_MAX_ROWS}) rows of each split",
            "label_rate": label_rate,  # marginal positive rate per task
        },
    )
    spec.save(root)  # last: spec.json marks the folder complete
    return spec


def config_hash(cfg: SyntheticConfig) -> str:
    blob = json.dumps({"v": GENERATOR_VERSION, "cfg": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_dataset(cfg: SyntheticConfig, cache_dir: str) -> str:
    """Return cache_dir/synthetic-<hash of cfg>, generating it first if it has no spec.json.

    Safe when several processes call it at once: each generates into its own temporary folder and the losers of the
    final rename use the winner's (identical) data.
    """
    out = os.path.join(os.path.abspath(cache_dir), f"synthetic-{config_hash(cfg)}")
    marker = os.path.join(out, SPEC_FILE)
    if os.path.isfile(marker):
        return out
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists but has no {SPEC_FILE} (not written by this generator?); delete it")
    try:
        generate(cfg, out, progress=True)
    except FileExistsError:
        if not os.path.isfile(marker):
            raise
    return out
