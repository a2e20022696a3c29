"""The benchmark's aggregation and table on hand-made runs (no training): lr selection on validation, the ‡ mark,
the replay's lift, and the driver's plan helpers."""

import math

import pytest

from data_pipeline.spec import DatasetSpec, FieldSpec
from launch import bench_report as br
from launch.benchmark import config_diff, default_model_overrides, parse_per_model, resolve_models

TASKS = ["click", "purchase"]
FRACTIONS = [0.01, 0.05, 0.1, 1.0]


def _run(model, lr, seed, valid, test_auc, capture, best_epoch=1):
    epochs = [{"epoch": e, "p": 0.5 - 0.25 * e, "p_end": 0.5 - 0.25 * e,
               "valid": {"auc": {"click": 0.6, "purchase": valid - 0.01 * (best_epoch - e)}},
               "valid_score": valid - 0.01 * (best_epoch - e)} for e in range(best_epoch + 1)]
    metrics = {"best_epoch": best_epoch, "epochs": epochs,
               "test": {"auc": {"click": test_auc[0], "purchase": test_auc[1]},
                        "logloss": {"click": 0.2, "purchase": 0.02}}}
    ev = {"rows": 1000, "positives": 40, "auc": test_auc[1], "ece_quantile": 0.01, "ece_uniform": 0.005,
          "mean_prob": 0.04, "fractions": FRACTIONS, "capture": capture}
    return {"model": model, "lr": lr, "seed": seed, "run_dir": f"/x/{model}-{lr}-{seed}", "status": "done",
            "seconds": 10.0, "error": None, "metrics": metrics, "eval": ev}


def _results(runs, alternative="greater"):
    spec = DatasetSpec(fields=[FieldSpec("u", 10)], labels=TASKS, splits={"test": []},
                       rows={"train": 1, "valid": 1, "test": 1000}, meta={}, root="/data")
    plan = {"preset": "p.yaml", "preset_name": "p", "command": "python launch/benchmark.py --config p", "out": "/o",
            "models": ["esmm", "aitm", "pimm"], "lrs": [0.001, 0.002], "seeds": [0, 1, 2], "budgets": [0.01, 0.1],
            "fractions": FRACTIONS, "model_overrides": {}, "overrides": [], "early_stop_metric": "final_auc",
            "curriculum": {"name": "epoch_linear", "alpha": 0.5, "speed": 0.25, "beta": 0.25}}
    return br.build_results(plan=plan, runs=runs, spec=spec, test_rates={"click": 0.04, "purchase": 0.004},
                            oracle={"auc_by_task": {"click": 0.7, "purchase": 0.8}, "source": "test"},
                            budgets=[0.01, 0.1], alternative=alternative, alpha=0.05)


def _sweep():
    runs = []
    for s, jitter in enumerate((-0.001, 0.0, 0.001)):
        # PIMM: lr 0.002 is better on validation (and on test); its purchase AUC beats aitm clearly, click does not
        runs.append(_run("pimm", 0.001, s, 0.70, (0.60, 0.70), [1, 5, 8, 40]))
        runs.append(_run("pimm", 0.002, s, 0.72 + jitter, (0.6205 + jitter, 0.75 + jitter), [4, 12, 20, 40]))
        runs.append(_run("aitm", 0.001, s, 0.71 + jitter, (0.62 + 2 * jitter, 0.72 + jitter), [3, 10, 16, 40]))
        runs.append(_run("aitm", 0.002, s, 0.69, (0.61, 0.71), [2, 9, 15, 40]))
        runs.append(_run("esmm", 0.001, s, 0.70 + jitter, (0.615 + jitter, 0.71 + jitter), [2, 8, 15, 40]))
    runs.append({"model": "esmm", "lr": 0.002, "seed": 0, "run_dir": "/x/failed", "status": "failed",
                 "seconds": 3.0, "error": "FloatingPointError: non-finite loss"})
    return runs


def test_lr_is_chosen_on_validation_and_test_reported_for_it():
    res = _results(_sweep())
    assert res["selection"]["pimm"]["lr"] == 0.002 and res["selection"]["aitm"]["lr"] == 0.001
    assert res["selection"]["esmm"]["lr"] == 0.001  # its lr 0.002 run failed: skipped, not fatal
    assert res["test"]["pimm"]["auc"]["purchase"]["mean"] == pytest.approx(0.75)
    assert res["test"]["pimm"]["auc"]["purchase"]["n"] == 3
    assert res["runs"]["failed"][0]["error"].startswith("FloatingPointError")


def test_dagger_only_where_pimm_beats_the_best_baseline_significantly():
    res = _results(_sweep())
    sig = res["significance"]
    assert sig["purchase"]["best_baseline"] == "aitm" and sig["purchase"]["significant"]
    assert sig["purchase"]["p"] < 1e-4
    # click: PIMM 0.6205 vs aitm 0.62, both with spread: not significant
    assert sig["click"]["best_baseline"] == "aitm" and not sig["click"]["significant"] and sig["click"]["p"] > 0.05
    md = br.render_markdown(res)
    pimm_row = next(line for line in md.splitlines() if line.startswith("| **pimm** | 0.002"))
    click_cell, purchase_cell = pimm_row.split(" | ")[2:4]
    assert "‡" not in click_cell and f"p={sig['click']['p']:.3f}" in click_cell
    assert "‡" in purchase_cell and "**0.7500 ± 0.0010**" in purchase_cell  # bold: the best mean of the column
    assert "| oracle (true probabilities) | – | 0.7000 | 0.8000 |" in md
    assert "failed: esmm lr=0.002 seed=0: FloatingPointError" in md


def test_two_sided_test_is_twice_as_strict():
    one = _results(_sweep(), "greater")["significance"]["click"]["p"]
    two = _results(_sweep(), "two-sided")["significance"]["click"]["p"]
    assert two == pytest.approx(2 * one)


def test_replay_lift_of_pimm_over_each_baseline():
    res = _results(_sweep())
    b1, b10 = res["replay"]["budgets"]
    assert b1["fraction"] == 0.01 and b1["selected_rows"] == 10 and b1["random"] == pytest.approx(0.4)
    assert b1["captured"]["pimm"]["mean"] == 4 and b1["captured"]["aitm"]["mean"] == 3
    assert b1["pimm_lift"]["aitm"]["lift"] == pytest.approx(4 / 3 - 1)
    assert b10["pimm_lift"]["esmm"]["lift"] == pytest.approx(20 / 15 - 1)
    assert math.isnan(b1["pimm_lift"]["aitm"]["p"])  # no variance on either side: undefined, not "significant"
    md = br.render_markdown(res)
    assert "| aitm | +33.3% (p=n/a) | +25.0% (p=n/a) |" in md


def test_plan_helpers():
    assert default_model_overrides("linear", 5, 2) == []  # D >= tasks: each task has its own weights already
    assert default_model_overrides("linear", 8, 3) == []
    assert default_model_overrides("linear", 1, 3) == ["model.embedding_dim=3"]
    assert default_model_overrides("linear", 4, 5) == ["model.embedding_dim=5"]
    assert default_model_overrides("pimm", 5, 2) == []
    models = resolve_models("all")
    assert models[-1] == "pimm" and models[0] == "linear" and "esmm" in models
    assert resolve_models("pimm, esmm,pimm") == ["pimm", "esmm"]
    with pytest.raises(ValueError):
        resolve_models("pimm,nope")
    assert parse_per_model(["linear:model.embedding_dim=8", "linear:train.lr=0.01"]) == \
        {"linear": ["model.embedding_dim=8", "train.lr=0.01"]}
    with pytest.raises(ValueError):
        parse_per_model(["model.embedding_dim=8"])
    run = {"train": {"epochs": 3, "log_every": 50}, "wandb": {"mode": "offline"}, "only_in_run": 1}
    now = {"train": {"epochs": 1, "log_every": 10}, "wandb": {"mode": "disabled"}, "only_now": 2}
    assert config_diff(run, now) == ["train.epochs: 3 (run) vs 1 (now)"]


def test_bench_presets_follow_the_paper_and_feed_two_workers():
    from data_pipeline.formats.csvfmt import AITM_FIELDS
    from launch.benchmark import resolve_preset
    from launch.config import load_config

    ali = load_config(resolve_preset("bench_aliccp"))
    assert ali.data.synthetic.tasks == ["click", "purchase"]
    assert list(ali.data.synthetic.fields) == AITM_FIELDS  # the names launch/prepare_data.py aliccp writes
    assert (ali.model.embedding_dim, ali.model.tower_dims, ali.model.num_experts) == (5, [128, 64, 32], 4)
    assert (ali.curriculum.alpha, ali.curriculum.speed, ali.curriculum.beta) == (0.5, 0.25, 0.25)
    fin = load_config(resolve_preset("bench_fintech"))
    assert fin.data.synthetic.tasks == ["click", "conversion", "core_conversion"]
    assert {"customer", "risk_level", "asset_tier", "fund", "campaign", "channel", "hour"} <= set(
        fin.data.synthetic.fields)
    assert (fin.curriculum.alpha, fin.curriculum.speed, fin.curriculum.beta) == (pytest.approx(2 / 3),
                                                                                 pytest.approx(1 / 3), 0.0)
    assert fin.model.num_experts == 6
    for cfg in (ali, fin):
        syn = cfg.data.synthetic
        for rows in (syn.rows_train, syn.rows_valid, syn.rows_test):  # every worker gets a whole shard file
            assert -(-rows // syn.rows_per_file) >= cfg.train.num_workers
        rates = syn.rates()
        final_rate = math.prod(rates)
        assert final_rate < 0.01 and rates[0] < 0.1  # sparse, as conversion data is
