"""Train a multi-task conversion model with Ray Train + TorchRec, then export it.

    python launch/train.py                                   # embedded default: local Ray, synthetic data, W&B offline
    python launch/train.py --config launch/configs/default.yaml train.epochs=2 data.path=/data/aliccp
    ray job submit --address http://127.0.0.1:8265 -- python launch/train.py train.num_workers=4

Prints the run folder: config.yaml, metrics.json, epoch_XXX/ checkpoints, model.pt (TorchScript), model.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import sys

import yaml

from distributed import storage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abs(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def resolve_resume(path: str) -> str:
    """A checkpoint folder as given, or a run folder's latest epoch_NNN checkpoint."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "train_state.json")):
        return path
    ckpts = sorted(d for d in os.listdir(path) if d.startswith("epoch_")) if os.path.isdir(path) else []
    if not ckpts:
        raise FileNotFoundError(f"resume={path}: neither a checkpoint folder (with train_state.json) nor a run folder "
                                "with epoch_NNN checkpoints")
    return os.path.join(path, ckpts[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML preset (default: launch/configs/default.yaml)")
    ap.add_argument("--resume", help="continue from a checkpoint folder, or a run folder's latest checkpoint "
                                     "(same as resume=PATH); the worker count may differ")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=2 model.name=pimm seed=1")
    args = ap.parse_args(argv)

    from launch.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides + ([f"resume={args.resume}"] if args.resume else []))
        if cfg.resume:
            cfg.resume = resolve_resume(cfg.resume)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from data_pipeline.preflight import DataError, preflight
    from data_pipeline.spec import DatasetSpec
    from data_pipeline.synthetic import ensure_dataset

    if cfg.data.path is None:
        print("[pimm] no data.path: using the synthetic data set (generated once, then cached)", flush=True)
        cfg.data.path = ensure_dataset(cfg.data.synthetic, _abs(cfg.data.cache_dir))
    cfg.data.path = os.path.abspath(cfg.data.path)
    try:  # fail here, before Ray starts, if the data folder is wrong
        spec = DatasetSpec.load(cfg.data.path)
        preflight(spec, cfg.train.num_workers)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.abspath(cfg.run.dir or _abs(os.path.join("runs", f"{cfg.model.name}-{stamp}")))
    cfg.run.dir = run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    run_name = os.path.basename(run_dir)
    # stable for this run folder (a restarted worker group continues the same W&B run), distinct for two folders
    # of the same name (e.g. two benchmark sweeps), which W&B would otherwise merge into one run
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:48] + "-" + hashlib.sha1(run_dir.encode()).hexdigest()[:8]
    # checkpoints + records: the run folder itself, or <run.storage_path>/<run name> (shared folder or URI)
    storage_root = cfg.run.storage_path or os.path.dirname(run_dir)
    if not storage.is_uri(storage_root):
        storage_root = os.path.abspath(storage_root)
    store = storage.join(storage_root, run_name)
    print(f"[pimm] run folder {run_dir}; data {cfg.data.path} ({spec.rows}); tasks {spec.labels}", flush=True)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distributed.env import backend_for
    from launch.worker import train_loop_per_worker

    # TorchRec's planner visits proposals in an order keyed by Python string hashes, so with per-process hash
    # randomisation two runs (or a restarted worker group) can pick different, equally rated plans, and so a
    # different initialisation. A fixed hash seed in the workers makes the plan a function of the config.
    # Ray Train V2 reroutes print() in workers through its logger and also tees it to stdout when stdout is
    # wrapped (W&B wraps it on rank 0), so every progress line arrived twice: keep print() plain.
    runtime_env = {"env_vars": {"PYTHONHASHSEED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit` or pointed at a cluster: join it as it is
            ray.init(runtime_env=runtime_env)
        else:
            need = cfg.train.num_workers * cfg.train.cpus_per_worker
            ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, runtime_env=runtime_env)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": run_dir, "store": store, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                     placement_strategy=cfg.train.placement_strategy),
        torch_config=TorchConfig(backend=backend_for(cfg.train.use_gpu)),
        run_config=RunConfig(
            name=run_name, storage_path=storage_root,
            # retention is pimm's (rank 0 keeps the last K plus the best, see prune_checkpoints): Ray's num_to_keep
            # keeps either the K best or the K last, and a restart needs the newest while the export needs the best
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the cause, not Ray's traceback
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        ours = [ln for ln in lines if "Error: " in ln and "ray." not in ln.split("Error: ")[0]]
        print(f"[pimm] training failed: {(ours or lines or [repr(e)])[-1]}", file=sys.stderr, flush=True)
        print(f"[pimm] checkpoints kept in {store}; continue with --resume {store}", file=sys.stderr, flush=True)
        return 1

    from launch.export import artifact_files, export_run
    from launch.worker import EXPORT_REFERENCE_FILE, METRICS_FILE

    if store != run_dir:  # rank 0 wrote its records to the storage; keep a copy in the local run folder
        for name in (METRICS_FILE, EXPORT_REFERENCE_FILE):
            with open(os.path.join(run_dir, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(store, name)))
    card = export_run(run_dir, parity_rows=cfg.run.export_parity_rows or None, program=cfg.run.export_program)
    if store != run_dir:
        for name in (*artifact_files(cfg.run.export_program), "config.yaml"):
            storage.upload_file(os.path.join(run_dir, name), storage.join(store, name))
    print(f"[pimm] exported {os.path.join(run_dir, 'model.pt')} (max abs diff vs trained model "
          f"{card['export_max_abs_diff']:.2e})", flush=True)
    print(f"[pimm] done: {run_dir}" + (f" (checkpoints and artifact also in {store})" if store != run_dir else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
