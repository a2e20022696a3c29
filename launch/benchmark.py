"""The paper's protocol on one preset: every (model, learning rate, seed) through the real distributed trainer, the
learning rate chosen per model on the validation split, test metrics over seeds with Welch's t-test, the targeting
replay and plots.

    python launch/benchmark.py --config launch/configs/bench_aliccp.yaml --models all --seeds 5 --lr-sweep
    python launch/benchmark.py --config bench_fintech --models pimm,aitm,esmm --seeds 3 train.epochs=2
    python launch/benchmark.py --config bench_aliccp data.path=data/aliccp      # real shards (launch/prepare_data.py)

Writes <out>/results.md, results.json, valid_auc.png, curriculum_p.png and lift_curve.png; every run has its own
folder <out>/runs/<model>-lr<lr>-s<seed>/ (config.yaml, metrics.json, model.pt, ...). Running the same command
again resumes: finished runs (metrics.json and model.pt present) are kept, the others are (re)run — a run folder
left by an interrupted run continues from its last complete epoch checkpoint. A run folder trained with another
configuration is refused (use another --out). `--report-only` rewrites the report from what is finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR_GRID = [0.0005, 0.001, 0.0015, 0.002]  # the paper's sweep
DEFAULT_BUDGETS = "1,5,10"  # percent of the test impressions
# table order: the baselines as the paper lists them, the linear reference first, PIMM last
MODEL_ORDER = ["linear", "shared_bottom", "esmm", "mmoe", "ple", "aitm", "mncm", "pimm"]
RUN_RECORD = "bench_run.json"
# keys that may differ between a finished run and the current command without making the run a different experiment
IGNORED_KEYS = {"run.dir", "resume", "wandb.mode", "wandb.project", "wandb.entity", "wandb.group", "train.log_every"}


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class Run:
    model: str
    lr: float
    seed: int
    run_dir: str
    argv: List[str]
    status: str = "pending"  # pending | done | failed
    seconds: Optional[float] = None
    error: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model} lr={self.lr:g} seed={self.seed}"

    def finished(self) -> bool:
        return all(os.path.isfile(os.path.join(self.run_dir, f)) for f in ("metrics.json", "model.pt"))


def resolve_preset(name: str) -> str:
    """A YAML path as given, else a preset name in launch/configs/ (with or without .yaml)."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    from launch.config import CONFIG_DIR

    for cand in (os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".yaml")):
        if os.path.isfile(cand):
            return cand
    return os.path.abspath(name)  # load_config names the missing file


def resolve_models(spec: str) -> List[str]:
    from pimm_model.registry import MODELS

    if spec.strip() == "all":
        extra = sorted(m for m in MODELS if m not in MODEL_ORDER)
        order = [m for m in MODEL_ORDER if m != "pimm"] + extra + ["pimm"]
        return [m for m in order if m in MODELS]
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise ValueError(f"--models: unknown model(s) {unknown or spec!r}; registered: {sorted(MODELS)} or 'all'")
    return list(dict.fromkeys(names))


def default_model_overrides(name: str, embedding_dim: int, num_tasks: int) -> List[str]:
    """Settings a model needs beyond the preset. `linear`: an embedding size >= the number of tasks (as
    launch/configs/linear.yaml), so each task has its own per-id weights."""
    if name == "linear" and embedding_dim < num_tasks:
        return [f"model.embedding_dim={num_tasks}"]
    return []


def parse_per_model(items: List[str]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for item in items:
        name, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise ValueError(f"--per-model {item!r}: expected MODEL:key=value, e.g. linear:model.embedding_dim=8")
        out.setdefault(name.strip(), []).append(kv.strip())
    return out


def config_diff(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys present in both nested dicts whose values differ (keys in IGNORED_KEYS skipped)."""
    out = []
    for k in sorted(set(a) & set(b)):
        key = prefix + k
        if key in IGNORED_KEYS:
            continue
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            out += config_diff(a[k], b[k], key + ".")
        elif a[k] != b[k]:
            out.append(f"{key}: {a[k]!r} (run) vs {b[k]!r} (now)")
    return out


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def ensure_ray(num_workers: int, cpus_per_worker: int) -> bool:
    """Start Ray the way launch/train.py would (so main() leaves it alone); True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"PYTHONHASHSEED": "0"}}  # the same fixed sharding plan as launch/train.py
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, num_workers * cpus_per_worker), include_dashboard=False,
                 runtime_env=runtime_env)
    return True


def run_one(run: Run) -> None:
    """One run through launch/train.py's main() in this process; records time and outcome in the run folder."""
    from launch.train import main as train_main

    start = time.perf_counter()
    error = None
    try:
        rc = train_main(run.argv)
        if rc != 0:
            error = f"launch/train.py returned exit code {rc}"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a diverging lr, a bad config for one model...: record it, go on with the others
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    run.seconds = time.perf_counter() - start
    if error is None and not run.finished():
        error = "no metrics.json / model.pt after the run"
    run.status, run.error = ("done", None) if error is None else ("failed", error)
    os.makedirs(run.run_dir, exist_ok=True)
    _write_json(os.path.join(run.run_dir, RUN_RECORD),
                {"model": run.model, "lr": run.lr, "seed": run.seed, "seconds": run.seconds, "error": error,
                 "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="preset YAML, or a name in launch/configs/ (bench_aliccp, "
                                                    "bench_fintech, ...)")
    ap.add_argument("--models", default="all", help="'all' (every registered model) or a comma list, e.g. pimm,aitm")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per (model, lr) (default 5, as the paper)")
    ap.add_argument("--lr-sweep", action="store_true",
                    help=f"sweep train.lr over {LR_GRID} and pick it on validation (default: the config's lr)")
    ap.add_argument("--budgets", default=DEFAULT_BUDGETS, help="targeting budgets, percent of the test rows "
                                                               f"(default {DEFAULT_BUDGETS})")
    ap.add_argument("--out", help="output folder (default runs/bench-<preset name>)")
    ap.add_argument("--group", help="W&B group of the runs (default: the output folder's name)")
    ap.add_argument("--alternative", choices=("greater", "two-sided"), default="greater",
                    help="Welch t-test: one-sided 'greater' (H1: PIMM's mean is higher; default) or 'two-sided'")
    ap.add_argument("--alpha", type=float, default=0.05, help="significance level of the ‡ mark (default 0.05)")
    ap.add_argument("--per-model", action="append", default=[], metavar="MODEL:key=value",
                    help="an override for one model only (repeatable), e.g. linear:model.embedding_dim=8")
    ap.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run, e.g. train.epochs=2")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come before or after options

    from launch.config import ConfigError, load_config, to_dict

    preset = resolve_preset(args.config)
    preset_name = os.path.splitext(os.path.basename(preset))[0]
    try:
        budgets = sorted({float(b) / 100.0 for b in args.budgets.split(",") if b.strip()})
        if not budgets or not all(0.0 < b <= 1.0 for b in budgets):
            raise ValueError(f"--budgets {args.budgets!r}: percentages in (0, 100]")
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        models = resolve_models(args.models)
        per_model = parse_per_model(args.per_model)
        cfg = load_config(preset, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    for key in ("model.name", "seed", "run.dir", "resume") + (("train.lr",) if args.lr_sweep else ()):
        if any(o.split("=", 1)[0].strip().lstrip("-") == key for o in args.overrides):
            print(f"benchmark: error: {key} is set per run by the benchmark; leave it out of the overrides",
                  file=sys.stderr)
            return 2

    # ---- data: generated once here (cached), then every run gets the same data.path
    from data_pipeline.preflight import DataError, preflight
    from data_pipeline.spec import DatasetSpec
    from data_pipeline.synthetic import ensure_dataset

    data_path = cfg.data.path or ensure_dataset(cfg.data.synthetic, os.path.join(REPO_ROOT, cfg.data.cache_dir))
    data_path = os.path.abspath(data_path)
    try:
        spec = DatasetSpec.load(data_path)
        preflight(spec, cfg.train.num_workers)
        if "test" not in spec.splits or "valid" not in spec.splits:
            raise DataError(f"{data_path}: the benchmark needs a valid and a test split")
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"benchmark: data error: {e}", file=sys.stderr)
        return 2
    tasks = spec.labels

    out = os.path.abspath(args.out or os.path.join(REPO_ROOT, "runs", f"bench-{preset_name}"))
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    group = args.group or cfg.wandb.group or os.path.basename(out)
    lrs = LR_GRID if args.lr_sweep else [cfg.train.lr]
    seeds = list(range(args.seeds))
    overrides_by_model = {m: default_model_overrides(m, cfg.model.embedding_dim, len(tasks)) + per_model.get(m, [])
                          for m in models}

    # ---- plan, and what is already finished
    runs: List[Run] = []
    for m in models:
        for lr in lrs:
            for s in seeds:
                run_dir = os.path.join(out, "runs", f"{m}-lr{lr:g}-s{s}")
                # paths and names as JSON strings (valid YAML): a value like "2024" or "a: b" stays a string
                run_over = [*args.overrides, f"data.path={json.dumps(data_path)}", *overrides_by_model[m],
                            f"model.name={m}", f"train.lr={lr}", f"seed={s}", f"run.dir={json.dumps(run_dir)}",
                            f"wandb.group={json.dumps(group)}"]
                runs.append(Run(m, lr, s, run_dir, ["--config", preset, *run_over]))
    try:
        for r in runs:
            existing = os.path.join(r.run_dir, "config.yaml")
            if os.path.isfile(existing):
                import yaml

                with open(existing) as f:
                    was = yaml.safe_load(f) or {}
                now = to_dict(load_config(preset, r.argv[2:]))
                diff = config_diff(was, now)
                if diff:
                    print(f"benchmark: error: {r.run_dir} was trained with another configuration ("
                          + "; ".join(diff[:5]) + (" ..." if len(diff) > 5 else "") + "): pass another --out, or "
                          "delete that folder to retrain it", file=sys.stderr)
                    return 2
            if r.finished():
                r.status = "done"
                r.seconds = (_read_json(os.path.join(r.run_dir, RUN_RECORD)) or {}).get("seconds")
    except ConfigError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    todo = [r for r in runs if r.status != "done"]
    _say(f"{preset_name}: {len(models)} model(s) x {len(lrs)} lr x {len(seeds)} seed(s) = {len(runs)} runs; "
         f"{len(runs) - len(todo)} already finished, {len(todo)} to run; output {out}")
    for m, o in overrides_by_model.items():
        if o:
            _say(f"per-model overrides for {m}: {' '.join(o)}")

    # ---- train what is missing, one run at a time, in-process under one Ray instance
    if todo and not args.report_only:
        started_ray = ensure_ray(cfg.train.num_workers, cfg.train.cpus_per_worker)
        start = time.perf_counter()
        previous = [r.seconds for r in runs if r.status == "done" and r.seconds]
        durations: List[float] = []
        try:
            for i, r in enumerate(todo, 1):
                per_run = (sum(durations) / len(durations)) if durations else (
                    sum(previous) / len(previous) if previous else None)
                eta = f"~{_hms(per_run * (len(todo) - i + 1))} left" if per_run else "time left: after the first run"
                _say(f"run {i}/{len(todo)} ({len(runs) - len(todo)} finished before): {r.label} -> {r.run_dir} | "
                     f"elapsed {_hms(time.perf_counter() - start)}, {eta}")
                run_one(r)
                durations.append(r.seconds)
                _say(f"run {i}/{len(todo)} {'done' if r.status == 'done' else 'FAILED'} in {_hms(r.seconds)}: "
                     f"{r.label}" + (f" ({r.error})" if r.error else ""))
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        _say(f"trained {len(todo)} run(s) in {_hms(time.perf_counter() - start)}")
    elif args.report_only:
        for r in todo:
            rec = _read_json(os.path.join(r.run_dir, RUN_RECORD))
            if rec and rec.get("error"):
                r.status, r.error = "failed", rec["error"]

    # ---- report
    plan = {
        "preset": os.path.relpath(preset, REPO_ROOT), "preset_name": preset_name,
        "command": "python launch/benchmark.py " + shlex.join(argv),
        "out": out, "models": models, "lrs": lrs, "seeds": seeds, "budgets": budgets,
        "model_overrides": {m: o for m, o in overrides_by_model.items() if o}, "overrides": list(args.overrides),
        "early_stop_metric": cfg.train.early_stop_metric,
        "curriculum": {"name": cfg.curriculum.name, "alpha": cfg.curriculum.alpha, "speed": cfg.curriculum.speed,
                       "beta": cfg.curriculum.beta},
    }
    return report(runs, spec, plan, args.alternative, args.alpha)


def report(runs: List[Run], spec, plan: Dict[str, Any], alternative: str, alpha: float) -> int:
    """Score every finished run's model.pt on the test split, then write results.json, results.md and the plots."""
    from launch import bench_report as br

    out = plan["out"]
    done = [r for r in runs if r.status == "done"]
    if not done:
        _say("no finished run to report")
        return 1
    t0 = time.perf_counter()
    labels, oracle_probs = br.read_test_labels(spec)
    plan = {**plan, "fractions": sorted(set(br.CURVE_FRACTIONS) | set(plan["budgets"]))}
    for r in done:
        with open(os.path.join(r.run_dir, "metrics.json")) as f:
            r.extra["metrics"] = json.load(f)
        r.extra["eval"] = br.evaluate_run(r.run_dir, spec, labels[:, -1], plan["fractions"])
    oracle = br.oracle_eval(spec, labels, oracle_probs, plan["fractions"])
    test_rates = {t: float(labels[:, i].mean()) if len(labels) else float("nan") for i, t in enumerate(spec.labels)}
    dicts = [{"model": r.model, "lr": r.lr, "seed": r.seed, "run_dir": r.run_dir, "status": r.status,
              "seconds": r.seconds, "error": r.error, **r.extra} for r in runs]
    res = br.build_results(plan=plan, runs=dicts, spec=spec, test_rates=test_rates, oracle=oracle,
                           budgets=plan["budgets"], alternative=alternative, alpha=alpha)
    res["report_seconds"] = time.perf_counter() - t0
    _write_json(os.path.join(out, "results.json"), _jsonable(res))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(br.render_markdown(res))
    br.write_plots(res, out)
    _say(f"report in {_hms(time.perf_counter() - t0)}: {os.path.join(out, 'results.md')} (+ results.json, "
         "valid_auc.png, curriculum_p.png, lift_curve.png)")
    for t, s in res["significance"].items():
        _say(f"{t}: pimm {s['pimm_mean']:.4f} vs best baseline {s['best_baseline']} {s['baseline_mean']:.4f} "
             f"({s['diff']:+.4f} AUC), p={s['p']:.3g}{' ‡' if s['significant'] else ''}")
    unfinished = [r for r in runs if r.status != "done"]
    if unfinished:
        _say(f"{len(unfinished)} run(s) not finished: " + ", ".join(r.label for r in unfinished[:8])
             + (" ..." if len(unfinished) > 8 else ""))
        return 1
    return 0


def _jsonable(x: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
