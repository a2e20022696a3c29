"""The benchmark's report: score the test split with each run's exported model, aggregate over seeds, write
results.json, results.md and the plots. Called by launch/benchmark.py once the runs are finished; the statistics
themselves are the pure functions of launch/bench_stats.py.

Per run (cached in <run dir>/bench_eval.json, recomputed when model.pt or the budgets change): the TorchScript
model.pt scores the test shards batch by batch (pyarrow, one record batch at a time) and keeps only the final task's
probabilities, from which come the ECE and the captured positives of the targeting replay at every budget.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.spec import DatasetSpec
from data_pipeline.synthetic import rank_auc
from launch import bench_stats as st

EVAL_FILE = "bench_eval.json"
EVAL_VERSION = 1
SCORE_BATCH_ROWS = 65_536
ECE_BINS = 10
# budgets (fractions of the test rows) of the lift curve, besides the reported ones
CURVE_FRACTIONS = [0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                   0.9, 1.0]
PIMM = "pimm"


# ----------------------------------------------------------------------------------------------- reading the test split

def _iter_test_batches(spec: DatasetSpec, columns: List[str]) -> Iterator[pa.RecordBatch]:
    """The test split's `columns`, file by file in spec order, one Parquet record batch at a time."""
    for path in spec.files("test"):
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=SCORE_BATCH_ROWS, columns=columns)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(batch.schema.get_field_index(name))


def read_test_labels(spec: DatasetSpec) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(labels (n, T) int8, oracle probabilities (n, T) float64 or None) of the test split, in file order.

    The oracle columns (`oracle_<task>`, the generator's true marginal probabilities) are read when every test
    shard has them (synthetic data); real data has none.
    """
    oracle_cols = [f"oracle_{t}" for t in spec.labels]
    has_oracle = all(set(oracle_cols) <= set(pq.read_schema(p).names) for p in spec.files("test"))
    cols = list(spec.labels) + (oracle_cols if has_oracle else [])
    ys, os_ = [], []
    for batch in _iter_test_batches(spec, cols):
        ys.append(np.stack([_column(batch, t).to_numpy(zero_copy_only=False).astype(np.int8) for t in spec.labels],
                           axis=1))
        if has_oracle:
            os_.append(np.stack([_column(batch, c).to_numpy(zero_copy_only=False).astype(np.float64)
                                 for c in oracle_cols], axis=1))
    labels = np.concatenate(ys) if ys else np.zeros((0, len(spec.labels)), dtype=np.int8)
    return labels, (np.concatenate(os_) if has_oracle and os_ else None)


def score_test_split(run_dir: str, spec: DatasetSpec) -> np.ndarray:
    """Final-task probabilities (n,) float32 of the test split from <run_dir>/model.pt, in file order.

    The shards hold vocabulary indices (what the trainer reads), so the artifact's index entry points are used:
    `forward_indices(ids (B, F))` when the artifact has one (a serving model that maps raw values itself), else
    `forward(ids (B, F))`; with multi-valued fields `forward_jagged(values, lengths)`. Field order: model.json's.
    """
    import torch

    with open(os.path.join(run_dir, "model.json")) as f:
        card = json.load(f)
    fields = [fd["name"] for fd in card["fields"]]
    multi = any(fd.get("multi_valued") for fd in card["fields"])
    weight_col = {fd["name"]: fd["weight_column"] for fd in card["fields"] if fd.get("weighted")}
    if list(card["tasks"]) != list(spec.labels):
        raise ValueError(f"{run_dir}: model tasks {card['tasks']} differ from the data's labels {spec.labels}")
    model = torch.jit.load(os.path.join(run_dir, "model.pt"))
    dense = model.forward_indices if hasattr(model, "forward_indices") else model
    out: List[np.ndarray] = []
    with torch.no_grad():
        for batch in _iter_test_batches(spec, fields + list(weight_col.values())):
            if not multi:
                ids = np.stack([_column(batch, n).to_numpy(zero_copy_only=False) for n in fields], axis=1)
                probs = dense(torch.from_numpy(ids.astype(np.int64, copy=False)))  # (B, T)
            else:
                values, lengths, weights = [], [], []
                for n in fields:  # field-major KJT layout
                    col = _column(batch, n)
                    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                        values.append(col.flatten().to_numpy(zero_copy_only=False))
                        lengths.append(np.diff(col.offsets.to_numpy()))
                    else:
                        values.append(col.to_numpy(zero_copy_only=False))
                        lengths.append(np.ones(len(col), dtype=np.int64))
                    weights.append(_column(batch, weight_col[n]).flatten().to_numpy(zero_copy_only=False)
                                   if n in weight_col else np.ones(len(values[-1]), dtype=np.float32))
                args = [torch.from_numpy(np.concatenate(values).astype(np.int64)),
                        torch.from_numpy(np.concatenate(lengths).astype(np.int64))]
                if weight_col:
                    args.append(torch.from_numpy(np.concatenate(weights).astype(np.float32)))
                probs = model.forward_jagged(*args)
            final = probs[spec.labels[-1]] if isinstance(probs, dict) else probs[:, -1]  # (B,)
            out.append(final.float().numpy().copy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- per-run evaluation

def final_task_eval(probs: np.ndarray, labels: np.ndarray, fractions: Sequence[float]) -> Dict[str, Any]:
    """The final task's calibration and targeting numbers for one scorer: probs (n,), labels (n,) 0/1."""
    return {
        "rows": int(labels.size), "positives": int(labels.sum()),
        "auc": rank_auc(labels, probs),
        "logloss": st.log_loss(probs, labels),
        "ece_quantile": st.expected_calibration_error(probs, labels, ECE_BINS, "quantile"),
        "ece_uniform": st.expected_calibration_error(probs, labels, ECE_BINS, "uniform"),
        "mean_prob": float(np.mean(probs)) if probs.size else float("nan"),
        "fractions": list(fractions),
        "capture": st.capture_at(probs, labels, fractions),
    }


def evaluate_run(run_dir: str, spec: DatasetSpec, final_labels: np.ndarray, fractions: Sequence[float]) -> Dict:
    """final_task_eval of one run's exported model, cached in <run_dir>/bench_eval.json."""
    path = os.path.join(run_dir, EVAL_FILE)
    stamp = os.path.getmtime(os.path.join(run_dir, "model.pt"))
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if (cached.get("version") == EVAL_VERSION and cached.get("model_pt_mtime") == stamp
                and cached.get("fractions") == list(fractions) and cached.get("rows") == int(final_labels.size)):
            return cached
    probs = score_test_split(run_dir, spec)
    if probs.size != final_labels.size:
        raise ValueError(f"{run_dir}: scored {probs.size} test rows, the labels have {final_labels.size}")
    ev = final_task_eval(probs, final_labels, fractions)
    ev.update(version=EVAL_VERSION, model_pt_mtime=stamp)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ev, f, indent=1)
    os.replace(tmp, path)
    return ev


def oracle_eval(spec: DatasetSpec, labels: np.ndarray, oracle: Optional[np.ndarray],
                fractions: Sequence[float]) -> Optional[Dict[str, Any]]:
    """The true probabilities as a scorer: AUC and log loss per task, the final task's ECE and replay. From the
    shards' oracle columns; else spec.meta["oracle_auc"]["test"] (AUC only); None for real data."""
    tasks = spec.labels
    if oracle is not None:
        out = final_task_eval(oracle[:, -1], labels[:, -1], fractions)
        out["auc_by_task"] = {t: rank_auc(labels[:, i], oracle[:, i]) for i, t in enumerate(tasks)}
        out["logloss_by_task"] = {t: st.log_loss(oracle[:, i], labels[:, i]) for i, t in enumerate(tasks)}
        out["source"] = "oracle_<task> columns of the test shards"
        return out
    auc = (spec.meta.get("oracle_auc") or {}).get("test")
    if auc:
        return {"auc_by_task": {t: float(auc[t]) for t in tasks}, "source": "spec.json meta.oracle_auc.test"}
    return None


# ----------------------------------------------------------------------------------------------- aggregation

def _best_record(metrics: Dict[str, Any]) -> Dict[str, Any]:
    best = metrics["best_epoch"]
    return next(r for r in metrics["epochs"] if r["epoch"] == best)


def _stat(values: Sequence[float]) -> Dict[str, Any]:
    mean, std = st.mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": [float(v) for v in values]}


def build_results(*, plan: Dict[str, Any], runs: List[Dict[str, Any]], spec: DatasetSpec,
                  test_rates: Dict[str, float], oracle: Optional[Dict[str, Any]], budgets: Sequence[float],
                  alternative: str, alpha: float) -> Dict[str, Any]:
    """Everything results.md and the plots show, from the finished runs.

    test_rates: positive rate of each task on the test split (of impressions).
    runs: one dict per planned run with model, lr, seed, run_dir, status ('done' | 'failed' | 'pending'), and for
    done runs `metrics` (metrics.json) and `eval` (evaluate_run's dict).
    """
    tasks = list(spec.labels)
    final = tasks[-1]
    models = list(plan["models"])
    done = [r for r in runs if r["status"] == "done"]

    selection: Dict[str, Any] = {}
    chosen: Dict[str, List[Dict[str, Any]]] = {}
    for m in models:
        by_lr: Dict[float, List[float]] = {lr: [] for lr in plan["lrs"]}
        for r in done:
            if r["model"] == m:
                by_lr[r["lr"]].append(_best_record(r["metrics"])["valid_score"])
        try:
            lr = st.select_lr(by_lr)
        except ValueError:
            selection[m] = {"lr": None, "valid_score_by_lr": {str(k): _stat(v) for k, v in by_lr.items()}}
            continue
        selection[m] = {"lr": lr, "valid_score_by_lr": {str(k): _stat(v) for k, v in by_lr.items()}}
        chosen[m] = sorted((r for r in done if r["model"] == m and r["lr"] == lr), key=lambda r: r["seed"])
    ranked = [m for m in models if m in chosen]

    test: Dict[str, Any] = {}
    for m in ranked:
        rs = chosen[m]
        test[m] = {
            "lr": selection[m]["lr"], "seeds": [r["seed"] for r in rs],
            "auc": {t: _stat([r["metrics"]["test"]["auc"][t] for r in rs]) for t in tasks},
            "logloss": {t: _stat([r["metrics"]["test"]["logloss"][t] for r in rs]) for t in tasks},
            "ece_quantile": _stat([r["eval"]["ece_quantile"] for r in rs]),
            "ece_uniform": _stat([r["eval"]["ece_uniform"] for r in rs]),
            "mean_prob": _stat([r["eval"]["mean_prob"] for r in rs]),
            "best_epoch": [r["metrics"]["best_epoch"] for r in rs],
            # the exported model rescored by this report vs the trainer's own test AUC (a consistency check)
            "rescore_auc_max_abs_diff": max(abs(r["eval"]["auc"] - r["metrics"]["test"]["auc"][final]) for r in rs),
        }

    significance: Dict[str, Any] = {}
    if PIMM in test:
        for t in tasks:
            means = {m: test[m]["auc"][t]["mean"] for m in ranked}
            base = st.best_baseline(means, PIMM)
            if not base:
                continue
            tstat, p = st.welch_ttest(test[PIMM]["auc"][t]["values"], test[base]["auc"][t]["values"], alternative)
            significance[t] = {"best_baseline": base, "pimm_mean": means[PIMM], "baseline_mean": means[base],
                               "diff": means[PIMM] - means[base], "t": tstat, "p": p,
                               "significant": bool(p < alpha and means[PIMM] > means[base]) if not math.isnan(p)
                               else False}

    # targeting replay: captured final-task positives at each budget, means over the chosen lr's seeds
    fractions = list(plan["fractions"])
    rows = int(next(iter(chosen.values()))[0]["eval"]["rows"]) if chosen else 0
    positives = int(next(iter(chosen.values()))[0]["eval"]["positives"]) if chosen else 0
    capture = {m: [[r["eval"]["capture"][fractions.index(f)] for r in chosen[m]] for f in fractions] for m in ranked}
    replay: Dict[str, Any] = {"rows": rows, "positives": positives, "budgets": []}
    for b in budgets:
        i = fractions.index(b)
        entry: Dict[str, Any] = {"fraction": b, "selected_rows": st.budget_rows(rows, b),
                                 "random": b * positives if rows else 0.0,
                                 "captured": {m: _stat(capture[m][i]) for m in ranked}}
        if oracle and "capture" in oracle:
            entry["oracle"] = oracle["capture"][i]
        if PIMM in capture:
            pm = capture[PIMM][i]
            entry["pimm_lift"] = {}
            for m in ranked:
                if m == PIMM:
                    continue
                _, p = st.welch_ttest(pm, capture[m][i], alternative)
                entry["pimm_lift"][m] = {"lift": st.relative_lift(float(np.mean(pm)), float(np.mean(capture[m][i]))),
                                         "p": p}
        replay["budgets"].append(entry)
    replay["curve"] = {"fractions": fractions, "random": [f * positives for f in fractions],
                       "models": {m: [float(np.mean(c)) for c in capture[m]] for m in ranked}}
    if oracle and "capture" in oracle:
        replay["curve"]["oracle"] = oracle["capture"]

    curves = {m: {"seeds": [r["seed"] for r in chosen[m]],
                  "valid_auc_final": [[e["valid"]["auc"][final] for e in r["metrics"]["epochs"]] for r in chosen[m]],
                  "p": [[e["p"] for e in r["metrics"]["epochs"]] for r in chosen[m]],
                  "p_end": [[e.get("p_end", e["p"]) for e in r["metrics"]["epochs"]] for r in chosen[m]]}
              for m in ranked}

    failed = [{k: r.get(k) for k in ("model", "lr", "seed", "run_dir", "error")} for r in runs
              if r["status"] == "failed"]
    pending = [{k: r.get(k) for k in ("model", "lr", "seed", "run_dir")} for r in runs if r["status"] == "pending"]
    seconds = [r["seconds"] for r in done if r.get("seconds")]
    return {
        **plan, "tasks": tasks, "final_task": final,
        "data": {"path": spec.root, "rows": spec.rows,
                 "synthetic": spec.meta.get("generator") == "data_pipeline.synthetic",
                 "label_rate_test": (spec.meta.get("label_rate") or {}).get("test"),
                 "test_positive_rate": {t: float(test_rates[t]) for t in tasks}},
        "significance_test": {"name": "Welch's t-test (unequal variances), scipy.stats.ttest_ind(equal_var=False)",
                              "alternative": alternative, "alpha": alpha,
                              "h1": "PIMM's mean > the best baseline's mean" if alternative == "greater"
                              else "PIMM's mean != the best baseline's mean",
                              "on": "test AUC over seeds: PIMM vs the baseline with the highest mean test AUC, "
                                    "per task"},
        "ece": {"bins": ECE_BINS, "reported": "quantile (equal-mass bins; edges at the prediction deciles)",
                "also": "uniform (equal-width bins) in test.<model>.ece_uniform"},
        "selection": selection, "test": test, "significance": significance, "oracle": oracle, "replay": replay,
        "curves": curves,
        "runs": {"planned": len(runs), "done": len(done), "failed": failed, "pending": pending,
                 "seconds_total": float(sum(seconds)), "seconds_mean": float(np.mean(seconds)) if seconds else None,
                 "seconds_by_model": {m: float(np.mean([r["seconds"] for r in done if r["model"] == m
                                                        and r.get("seconds")] or [float("nan")])) for m in models}},
    }


# ----------------------------------------------------------------------------------------------- results.md

def _show(path: str) -> str:
    """A path relative to the repository root when it lies inside it (results.md may be committed), else as is."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _f(x: Optional[float], digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "p=n/a"
    return f"p={p:.3f}" if p >= 0.001 else f"p={p:.1e}"


def _pct(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return "+∞" if math.isinf(x) else f"{x:+.1%}"


def _budget_label(f: float) -> str:
    return f"top {f * 100:g}%"


def render_markdown(res: Dict[str, Any]) -> str:
    tasks, final, test = res["tasks"], res["final_task"], res["test"]
    ranked = list(test)
    seeds = res["seeds"]
    sig = res["significance"]
    oracle = res.get("oracle")
    L: List[str] = []
    data = res["data"]
    L.append(f"# Benchmark: {res['preset_name']}")
    L.append("")
    L.append(f"Command (from the repository root): `{res['command']}`")
    L.append("")
    if data["synthetic"]:
        L.append(f"Data: **generated** (`data_pipeline.synthetic`) — NOT the paper's data set; "
                 f"`{_show(data['path'])}`.")
    else:
        L.append(f"Data: `{_show(data['path'])}`.")
    rates = ", ".join(f"{t} {100 * r:.3g}%" for t, r in data["test_positive_rate"].items() if not math.isnan(r))
    L.append(f"Rows: train {data['rows'].get('train', 0):,}, valid {data['rows'].get('valid', 0):,}, test "
             f"{data['rows'].get('test', 0):,}; test positive rate (of impressions): {rates}.")
    L.append("")
    lrs = ", ".join(f"{lr:g}" for lr in res["lrs"])
    L.append(f"Protocol: {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) per (model, learning rate); learning "
             f"rate{'s' if len(res['lrs']) > 1 else ''} {{{lrs}}}, chosen per model on the **validation** split (the "
             f"highest mean over seeds of the best epoch's validation score, `{res['early_stop_metric']}`); the "
             f"test numbers are those of the chosen rate: mean ± sample std over seeds.")
    if res["model_overrides"]:
        L.append("Per-model overrides: " + "; ".join(f"`{m}`: `{' '.join(o)}`" for m, o in
                                                     res["model_overrides"].items()) + ".")
    if res["overrides"]:
        L.append(f"Config overrides: `{' '.join(res['overrides'])}`.")
    L.append("")

    # --- summary line per task
    if sig:
        L.append("## Summary")
        L.append("")
        for t in tasks:
            if t not in sig:
                continue
            s = sig[t]
            verdict = "significant (‡)" if s["significant"] else "not significant"
            L.append(f"- **{t}**: PIMM {_f(s['pimm_mean'])} vs best baseline {s['best_baseline']} "
                     f"{_f(s['baseline_mean'])} ({s['diff']:+.4f} AUC), {_p(s['p'])}: {verdict}.")
        L.append("")

    # --- AUC table (the paper's form) + log loss beside it
    L.append(f"## Test AUC and log loss (mean ± std over {len(seeds)} seed(s))")
    L.append("")
    best = {t: max(ranked, key=lambda m: test[m]["auc"][t]["mean"]) for t in tasks} if ranked else {}
    head = ["model", "lr"] + [f"{t} AUC" for t in tasks] + [f"{t} log loss" for t in tasks]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for m in ranked:
        cells = [f"**{m}**" if m == PIMM else m, f"{test[m]['lr']:g}"]
        for t in tasks:
            c = st.fmt_mean_std(test[m]["auc"][t]["values"])
            if best.get(t) == m:
                c = f"**{c}**"
            if m == PIMM and t in sig:
                c += (" ‡" if sig[t]["significant"] else "") + f" ({_p(sig[t]['p'])})"
            cells.append(c)
        cells += [st.fmt_mean_std(test[m]["logloss"][t]["values"]) for t in tasks]
        L.append("| " + " | ".join(cells) + " |")
    if oracle:
        cells = ["oracle (true probabilities)", "–"] + [_f(oracle["auc_by_task"].get(t)) for t in tasks]
        cells += [_f(oracle.get("logloss_by_task", {}).get(t)) for t in tasks]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    s = res["significance_test"]
    side = "one-sided (H1: PIMM's mean is higher)" if s["alternative"] == "greater" else "two-sided"
    L.append("Bold: the best mean per column. ‡: PIMM beats the best baseline of that column (the baseline with the "
             "highest mean test AUC: " + ", ".join(f"{t} → {sig[t]['best_baseline']}" for t in tasks if t in sig)
             + f") with p < {s['alpha']:g}, Welch's t-test over seeds, {side}; the p-value is printed for every "
             f"task. With fewer than 2 seeds per model, or no variance, the test is undefined (p=n/a).")
    if oracle:
        L.append(f"Oracle: the generator's true P(task | impression) as the score ({oracle['source']}): the best "
                 "AUC any model can reach on this test split.")
    L.append("")

    # --- calibration
    L.append(f"## Calibration of the final task ({final})")
    L.append("")
    L.append("| model | ECE (10 equal-mass bins) | ECE (10 equal-width bins) | mean predicted / observed rate |")
    L.append("|---|---|---|---|")
    rate = data["test_positive_rate"].get(final, float("nan"))
    for m in ranked:
        ratio = [v / rate for v in test[m]["mean_prob"]["values"]] if rate and not math.isnan(rate) else []
        L.append(f"| {m} | {st.fmt_mean_std(test[m]['ece_quantile']['values'], 5)} | "
                 f"{st.fmt_mean_std(test[m]['ece_uniform']['values'], 5)} | {st.fmt_mean_std(ratio, 3)} |")
    if oracle and "ece_quantile" in oracle:
        L.append(f"| oracle | {_f(oracle['ece_quantile'], 5)} | {_f(oracle['ece_uniform'], 5)} | "
                 f"{_f(oracle['mean_prob'] / rate if rate else float('nan'), 3)} |")
    L.append("")
    L.append("ECE = Σ_bins (rows in bin / rows) · |mean predicted probability − observed positive rate|. The "
             "equal-mass bins (edges at the deciles of the model's predictions) are the ones to read for a rare "
             "target: with equal-width bins nearly every prediction falls into [0, 0.1).")
    L.append("")

    # --- targeting replay
    rp = res["replay"]
    L.append("## Targeting replay (offline stand-in for the paper's Figure 4)")
    L.append("")
    L.append(f"Each model ranks the {rp['rows']:,} test impressions by its predicted P({final}) and selects the top "
             f"K%; the table gives the {final} positives among them (of {rp['positives']:,} in the split; mean ± std "
             "over seeds; rows tied at the cut are taken in expectation).")
    L.append("")
    head = ["model"] + [f"{_budget_label(b['fraction'])} ({b['selected_rows']:,} rows)" for b in rp["budgets"]]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    L.append("| random | " + " | ".join(f"{b['random']:.1f}" for b in rp["budgets"]) + " |")
    for m in ranked:
        L.append(f"| {'**pimm**' if m == PIMM else m} | "
                 + " | ".join(st.fmt_mean_std(b["captured"][m]["values"], 1) for b in rp["budgets"]) + " |")
    if rp["budgets"] and "oracle" in rp["budgets"][0]:
        L.append("| oracle | " + " | ".join(f"{b['oracle']:.1f}" for b in rp["budgets"]) + " |")
    L.append("")
    if PIMM in ranked and len(ranked) > 1:
        L.append(f"Relative lift of PIMM over each baseline at equal budget (PIMM's mean captured {final} positives "
                 f"/ the baseline's − 1; in brackets the Welch t-test p over seeds, "
                 f"{'one-sided' if s['alternative'] == 'greater' else 'two-sided'}):")
        L.append("")
        L.append("| baseline | " + " | ".join(_budget_label(b["fraction"]) for b in rp["budgets"]) + " |")
        L.append("|---|" + "---|" * len(rp["budgets"]))
        for m in ranked:
            if m == PIMM:
                continue
            L.append(f"| {m} | " + " | ".join(f"{_pct(b['pimm_lift'][m]['lift'])} ({_p(b['pimm_lift'][m]['p'])})"
                                               for b in rp["budgets"]) + " |")
        L.append("")

    # --- learning-rate selection
    L.append("## Learning-rate selection (validation split)")
    L.append("")
    head = ["model"] + [f"lr {lr:g}" for lr in res["lrs"]] + ["chosen"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for m, sel in res["selection"].items():
        cells = [m]
        for lr in res["lrs"]:
            v = sel["valid_score_by_lr"][str(lr)]
            cells.append(f"{st.fmt_mean_std(v['values'])} (n={v['n']})" if v["n"] else "–")
        cells.append("–" if sel["lr"] is None else f"{sel['lr']:g}")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"Validation score: `{res['early_stop_metric']}` of the best epoch (the epoch early stopping kept).")
    L.append("")

    # --- plots, runs
    L.append("## Plots")
    L.append("")
    L.append(f"![validation AUC of {final} per epoch](valid_auc.png)")
    L.append("")
    L.append("![curriculum p per epoch](curriculum_p.png)")
    L.append("")
    L.append(f"![captured {final} positives vs budget](lift_curve.png)")
    L.append("")
    r = res["runs"]
    L.append("## Runs")
    L.append("")
    mean_s = f"{r['seconds_mean']:.0f} s" if r["seconds_mean"] else "–"
    L.append(f"{r['done']} of {r['planned']} runs finished ({len(r['failed'])} failed, {len(r['pending'])} not run); "
             f"mean training time per run {mean_s}, total {r['seconds_total'] / 60:.1f} min. Run folders: "
             f"`{_show(res['out'])}/runs/<model>-lr<lr>-s<seed>/` (metrics.json, model.pt, config.yaml).")
    for fl in r["failed"]:
        L.append(f"- failed: {fl['model']} lr={fl['lr']:g} seed={fl['seed']}: {fl.get('error') or '?'}")
    drift = [(m, test[m]["rescore_auc_max_abs_diff"]) for m in ranked]
    worst = max((d for _, d in drift), default=0.0)
    L.append("")
    L.append(f"Consistency check: the test AUC of {final} recomputed from each exported model.pt differs from the "
             f"trainer's by at most {worst:.1e}.")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------- plots

def write_plots(res: Dict[str, Any], out_dir: str) -> List[str]:
    """valid_auc.png, curriculum_p.png, lift_curve.png in out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = res["final_task"]
    curves = res["curves"]
    models = list(curves)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    paths = []

    # 1) validation AUC of the final task per epoch: mean over seeds (line) and each seed (faint)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in models:
        seeds = curves[m]["valid_auc_final"]
        n_ep = max(len(s) for s in seeds)
        mean = [np.mean([s[e] for s in seeds if len(s) > e]) for e in range(n_ep)]
        for s in seeds:
            ax.plot(range(1, len(s) + 1), s, color=colors[m], alpha=0.25, lw=0.8)
        ax.plot(range(1, n_ep + 1), mean, color=colors[m], marker="o", lw=2.4 if m == PIMM else 1.6,
                label=f"{m} (lr {res['test'][m]['lr']:g})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation AUC ({final})")
    ax.set_title(f"{res['preset_name']}: validation AUC of {final} per epoch\n(mean over seeds; faint: each seed)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "valid_auc.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2) curriculum p per epoch (only PIMM reads it; the schedule is the same for every model)
    fig, ax = plt.subplots(figsize=(7, 4.0))
    who = PIMM if PIMM in curves else (models[0] if models else None)
    if who is not None:
        ps = max(curves[who]["p"], key=len)
        pe = max(curves[who]["p_end"], key=len)
        ep = np.arange(1, len(ps) + 1)
        ax.step(np.r_[ep, ep[-1] + 1] - 0.5, np.r_[ps, ps[-1]], where="post", color="tab:red", lw=2,
                label="p at epoch start (broadcast by rank 0)")
        ax.plot(ep, ps, "o", color="tab:red")
        if any(abs(a - b) > 1e-12 for a, b in zip(ps, pe)):
            ax.plot(ep + 0.45, pe, "x", color="tab:gray", label="p at epoch end (per-step schedule)")
        for x, y in zip(ep, ps):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    c = res["curriculum"]
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("epoch")
    ax.set_ylabel("p = P(feed the true previous label)")
    ax.set_title(f"curriculum p per epoch ({c['name']}: α={c['alpha']:.3g}, S={c['speed']:.3g}, β={c['beta']:.3g})"
                 f"\n{'PIMM' if who == PIMM else who}'s runs; only PIMM uses p")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "curriculum_p.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 3) lift curve: captured final-task positives vs budget, full range and the small budgets
    rp = res["replay"]
    cv = rp["curve"]
    fr = np.asarray(cv["fractions"]) * 100
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    zoom = max([b["fraction"] for b in rp["budgets"]] + [0.1]) * 100 * 2
    for ax, lim in zip(axes, (100.0, zoom)):
        keep = fr <= lim + 1e-9
        x = np.r_[0.0, fr[keep]]
        ax.plot(x, np.r_[0.0, np.asarray(cv["random"])[keep]], color="gray", ls=":", label="random")
        if "oracle" in cv:
            ax.plot(x, np.r_[0.0, np.asarray(cv["oracle"])[keep]], color="black", ls="--", label="oracle")
        for m in models:
            ax.plot(x, np.r_[0.0, np.asarray(cv["models"][m])[keep]], color=colors[m], marker=".",
                    lw=2.4 if m == PIMM else 1.4, label=m)
        for b in rp["budgets"]:
            if b["fraction"] * 100 <= lim:
                ax.axvline(b["fraction"] * 100, color="gray", lw=0.6, alpha=0.5)
        ax.set_xlim(0, lim)
        ax.set_xlabel("budget: top K% of test impressions by predicted score")
        ax.set_ylabel(f"{final} positives captured")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"all budgets ({rp['positives']:,} positives in {rp['rows']:,} rows)")
    axes[1].set_title(f"budgets up to {zoom:g}% (reported: "
                      + ", ".join(f"{b['fraction'] * 100:g}%" for b in rp["budgets"]) + ")")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{res['preset_name']}: targeting replay, captured {final} positives vs budget (mean over seeds)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "lift_curve.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
