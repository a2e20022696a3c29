"""The per-worker training loop run by Ray Train on every rank (with the driver, the only Ray-aware code).

Per epoch: rank 0 computes the curriculum p (eq. 4) and broadcasts it; every rank trains the same number of steps on
its own Parquet shards; the whole validation split is scored across ranks; a sharded DCP checkpoint is reported to
Ray; early stopping watches the validation score. At the end the best epoch is restored, the test split is scored,
and rank 0 writes metrics.json plus a reference batch that the export step checks the TorchScript model against.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import ray
import ray.train
import torch

from data_pipeline.reader import ShardReader, shard_files_for_rank
from data_pipeline.spec import DatasetSpec
from distributed import storage
from distributed.checkpoint import (
    latest_valid_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_train_state,
    save_checkpoint,
)
from distributed.collectives import (
    agree_max,
    agree_min,
    any_rank,
    barrier,
    broadcast_float,
    broadcast_object,
    gather_floats,
    gather_objects,
)
from distributed.env import current_env, peak_rss_mb, set_intra_op_threads
from distributed.optim import apply_sparse_optimizer, build_optimizer, resolve_sparse_optimizer
from distributed.sharding import describe_plan, shard_model
from launch.config import Config, config_from_dict, to_dict
from launch.evaluation import evaluate, validation_score
from launch.tracking import start_tracker
from pimm_model.model import MultiTaskTrain, build_model
from pimm_model.schedules import PER_STEP_SCHEDULES, curriculum_p

METRICS_FILE = "metrics.json"
EXPORT_REFERENCE_FILE = "export_reference.pt"


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def _say(is_rank_zero: bool, msg: str) -> None:
    if is_rank_zero:
        print(f"[pimm] {msg}", flush=True)


def _placement(rank: int) -> Dict[str, Any]:
    """Where this rank runs (recorded in metrics.json: multi-node runs are checked from it)."""
    return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "pid": os.getpid(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    cfg: Config = config_from_dict(config["cfg"])
    run_dir: str = config["run_dir"]  # the driver's run folder (this rank writes only W&B files under it)
    store: str = config["store"]  # checkpoints and records: == run_dir on one machine, else shared storage / URI
    run_id: str = config["run_id"]
    env = current_env(cfg.train.use_gpu)
    zero = env.is_rank_zero
    set_intra_op_threads(cfg.train.cpus_per_worker)

    # ---- data: each rank reads only its own shard files
    spec = DatasetSpec.load(cfg.data.path)
    tasks: List[str] = spec.labels
    bs = cfg.train.batch_size
    readers = {
        split: ShardReader(spec, shard_files_for_rank(spec.files(split), env.rank, env.world_size), bs,
                           shuffle=(split == "train"), seed=cfg.seed)
        for split in ("train", "valid", "test")
    }
    train_steps = agree_min(readers["train"].num_full_batches())
    if train_steps == 0:
        raise ValueError(f"train.batch_size={bs} is larger than the smallest worker's share of the train split "
                         f"({readers['train'].num_rows()} rows on rank {env.rank}); lower the batch size or workers")
    eval_steps = {s: agree_max(readers[s].num_padded_batches()) for s in ("valid", "test")}

    # ---- model: same initialisation on every rank for the same seed; embeddings on meta until sharded
    torch.manual_seed(cfg.seed)
    fields = [(f.name, f.num_embeddings) for f in spec.fields]
    model = MultiTaskTrain(build_model(cfg.model, fields, len(tasks), embedding_device=torch.device("meta"),
                                       weighted=spec.weighted))
    sparse_opt = resolve_sparse_optimizer(cfg.train.sparse_optimizer, cfg.train.use_gpu)
    _, sparse_kwargs = apply_sparse_optimizer(model.model.embedding, sparse_opt, cfg.train.sparse_lr,
                                              cfg.train.embedding_l2)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    dmp = shard_model(model, env.device, cfg.train.sharding_types, env.world_size, local_world,
                      replicate_max_bytes=int(cfg.train.replicate_max_mb * 2**20),
                      split_min_bytes=int(cfg.train.split_min_mb * 2**20), ddp_bucket_mb=cfg.train.ddp_bucket_mb)
    optimizer = build_optimizer(dmp, cfg.train.lr, cfg.train.weight_decay, sparse_opt, sparse_kwargs)
    train_module: MultiTaskTrain = dmp.module  # the unwrapped train wrapper: where p is set
    if os.environ.get("PYTHONHASHSEED") is None:
        _say(zero, "warning: PYTHONHASHSEED is not set in the workers: the sharding plan may differ between runs")
    _say(zero, f"{env.world_size} workers, {train_steps} steps/epoch of {bs} rows each, sparse optimizer "
               f"{sparse_opt}, plan {describe_plan(dmp)}")

    # ---- resume: after a worker failure Ray hands back this run's last reported checkpoint; otherwise `resume`
    # names a checkpoint of an earlier run (saved by any number of workers: DCP reshards)
    state: Dict[str, Any] = {"epoch": -1, "best_epoch": -1, "best_score": None, "best_dir": None, "history": [],
                             "restarts": 0}
    # Rank 0 picks: the newest complete checkpoint in this run's folder (Ray's controller registers reported
    # checkpoints asynchronously, so after an early failure get_checkpoint() can lag behind or be empty), else
    # the one Ray hands back (remote storage).
    restore_dir = broadcast_object(latest_valid_checkpoint(store) if zero and not storage.is_uri(store) else None)
    restored = ray.train.get_checkpoint() if restore_dir is None else None
    if restore_dir is not None or restored is not None:
        if restore_dir is not None:
            state = load_checkpoint(restore_dir, dmp, optimizer)
        else:
            with restored.as_directory() as d:
                state = load_checkpoint(d, dmp, optimizer)
        state["restarts"] = state.get("restarts", 0) + 1
        _say(zero, f"restored after a failure from epoch {state['epoch'] + 1} (best {state['best_epoch'] + 1})")
    elif cfg.resume:
        state = load_checkpoint(cfg.resume, dmp, optimizer)
        _say(zero, f"resumed from {cfg.resume} (epoch {state['epoch'] + 1}, saved by {state['world_size']} "
                   f"workers, now {env.world_size})")
    fault = _fault_injection()

    tracker = start_tracker(zero, cfg.wandb.mode, cfg.wandb.project, cfg.wandb.entity, cfg.wandb.group, run_dir,
                            run_id, to_dict(cfg))
    try:
        for epoch in range(state["epoch"] + 1, cfg.train.epochs):
            # eq. (4) (or the configured schedule) on rank 0 only, then broadcast: every worker uses exactly the
            # value it received. Adaptive schedules read the last validation metrics; per-step ones are recomputed
            # and broadcast every step.
            last_val = {"auc": state["history"][-1]["valid"]["auc"]} if state["history"] else None

            def p_at(step: int, epoch: int = epoch, last_val=last_val) -> float:
                return broadcast_float(curriculum_p(cfg.curriculum, epoch, step, train_steps, last_val)
                                       if zero else None)

            # per (seed, epoch, rank), not per process: a restart at an epoch boundary replays the epoch exactly
            torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + env.rank + 1)
            p = p_at(0)
            train_module.set_p(p)
            received = gather_floats(train_module.p)
            per_step = p_at if cfg.curriculum.name in PER_STEP_SCHEDULES else None
            train_loss, seconds = _train_epoch(dmp, optimizer, readers["train"], epoch, train_steps, tasks, cfg,
                                               env.world_size, zero, per_step, train_module,
                                               fault if fault and fault.get("rank") == env.rank else None,
                                               env.device)
            samples_per_s = train_steps * bs * env.world_size / max(seconds, 1e-9)
            val = evaluate(dmp, readers["valid"].iter_eval(eval_steps["valid"]), tasks, env.device)
            score = validation_score(val, tasks, cfg.train.early_stop_metric)
            improved = state["best_score"] is None or score > state["best_score"]
            if improved:
                state["best_epoch"], state["best_score"] = epoch, score
                state["best_dir"] = storage.join(store, checkpoint_name(epoch))
            rss = gather_floats(peak_rss_mb())  # every rank's peak so far: memory per worker, in W&B and metrics
            record = {"epoch": epoch, "p": p, "p_received_by_rank": received, "p_end": train_module.p,
                      "train_loss": train_loss, "samples_per_s": samples_per_s, "epoch_seconds": seconds,
                      "valid": val, "valid_score": score, "peak_rss_mb_by_rank": rss}
            state["history"].append(record)
            state["epoch"] = epoch
            _say(zero, f"epoch {epoch + 1}/{cfg.train.epochs} p={p:.4f} loss={sum(train_loss.values()):.4f} "
                       f"{samples_per_s:,.0f} samples/s valid AUC "
                       + " ".join(f"{t}={val['auc'][t]:.4f}" for t in tasks) + (" (best)" if improved else ""))
            tracker.log({"epoch": epoch, "p": p, "samples_per_s": samples_per_s, "valid/score": score,
                         "peak_rss_mb_max_rank": max(rss),
                         **{f"train/loss_{t}": v for t, v in train_loss.items()},
                         **{f"valid/auc_{t}": v for t, v in val["auc"].items()},
                         **{f"valid/logloss_{t}": v for t, v in val["logloss"].items()}}, step=epoch)
            _report_checkpoint(dmp, optimizer, state, epoch,
                               {"epoch": epoch, "p": p, "valid_score": score, "samples_per_s": samples_per_s},
                               store, zero)
            if zero:  # the last K and the best: a restart needs the newest, the export needs the best
                prune_checkpoints(store, cfg.run.keep_checkpoints, state["best_dir"])
            if epoch - state["best_epoch"] >= max(cfg.train.patience, 1) and epoch + 1 < cfg.train.epochs:
                _say(zero, f"early stop: no validation improvement for {epoch - state['best_epoch']} epochs")
                break

        # ---- the best epoch's weights give the test metrics and the exported model
        best_dir = state["best_dir"]
        if best_dir is None:
            raise RuntimeError("no epoch was trained: raise train.epochs above the resumed checkpoint's epoch")
        local_best, downloaded = storage.local_copy(best_dir)
        try:
            load_checkpoint(local_best, dmp)
        finally:
            if downloaded:
                shutil.rmtree(local_best, ignore_errors=True)
        test = evaluate(dmp, readers["test"].iter_eval(eval_steps["test"]), tasks, env.device)
        reference = _reference_batch(dmp, readers["test"], env.device)
        _say(zero, f"test AUC (best epoch {state['best_epoch'] + 1}) "
                   + " ".join(f"{t}={test['auc'][t]:.4f}" for t in tasks))
        placement = gather_objects(_placement(env.rank))
        rss = gather_floats(peak_rss_mb())
        if zero:
            buf = io.BytesIO()
            torch.save(reference, buf)
            storage.write_bytes(storage.join(store, EXPORT_REFERENCE_FILE), buf.getvalue())
            metrics = {"tasks": tasks, "best_epoch": state["best_epoch"], "best_checkpoint": best_dir,
                       "restarts": state.get("restarts", 0), "resumed_from": cfg.resume,
                       "early_stop_metric": cfg.train.early_stop_metric, "epochs": state["history"],
                       "test": test, "world_size": env.world_size, "sparse_optimizer": sparse_opt,
                       "sharding_plan": describe_plan(dmp), "workers": placement, "storage": store,
                       "peak_rss_mb": rss}
            storage.write_bytes(storage.join(store, METRICS_FILE), json.dumps(metrics, indent=1).encode())
            tracker.summary({f"test/auc_{t}": v for t, v in test["auc"].items()})
        ray.train.report({"done": 1, "best_epoch": state["best_epoch"],
                          **{f"test_auc_{t}": v for t, v in test["auc"].items()}})
    finally:
        tracker.finish()


def _train_epoch(dmp, optimizer, reader: ShardReader, epoch: int, steps: int, tasks: List[str], cfg: Config,
                 world_size: int, zero: bool, p_at_step: Optional[Callable[[int], float]],
                 train_module: MultiTaskTrain, fault: Optional[Dict[str, Any]], device: torch.device):
    dmp.train()
    sums = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    # Non-finite losses are recorded on the device, without a host sync or a collective per step (that per-step
    # all-reduce was 9% of a worker's step, docs/performance.md); the ranks agree every log_every steps and at the
    # end of the epoch, and all stop together naming the first bad step. The steps in between may apply a
    # non-finite update: harmless, since the epoch's checkpoint is written only after the last check.
    check_every = max(1, cfg.train.log_every)
    first_bad = torch.full((), steps, dtype=torch.int64, device=device)  # step of the first one (steps: none yet)
    first_bad_tasks = torch.zeros(len(tasks), dtype=torch.bool, device=device)  # tasks non-finite at that step
    start = last = time.perf_counter()
    for step, batch in enumerate(reader.iter_train(epoch, steps)):
        if fault is not None and fault["epoch"] == epoch and fault["step"] == step:
            if fault.get("kind", "kill") == "nan":  # a real NaN through the real loss of one task
                batch.labels[:, tasks.index(fault["task"])] = float("nan")  # (before the batch is moved)
            else:
                _kill_self(fault)
        if p_at_step is not None and step > 0:
            train_module.set_p(p_at_step(step))
        optimizer.zero_grad()
        loss, (task_losses, _, _, _) = dmp(batch.to(device, non_blocking=True))
        first = ~torch.isfinite(loss) & (first_bad == steps)
        first_bad = torch.where(first, torch.full_like(first_bad, step), first_bad)
        first_bad_tasks = torch.where(first, ~torch.isfinite(task_losses), first_bad_tasks)
        loss.backward()
        optimizer.step()
        sums += task_losses.double()
        if (step + 1) % check_every == 0 or step + 1 == steps:
            _stop_if_nonfinite(first_bad, first_bad_tasks, epoch, steps, tasks)
        if zero and (step + 1) % cfg.train.log_every == 0:
            now = time.perf_counter()
            rate = cfg.train.log_every * cfg.train.batch_size * world_size / max(now - last, 1e-9)
            last = now
            print(f"[pimm] epoch {epoch + 1} step {step + 1}/{steps} loss {loss.detach().item():.4f} "
                  f"{rate:,.0f} samples/s", flush=True)
    seconds = time.perf_counter() - start
    return {t: float(v) / max(steps, 1) for t, v in zip(tasks, sums.tolist())}, seconds


def _stop_if_nonfinite(first_bad: torch.Tensor, first_bad_tasks: torch.Tensor, epoch: int, steps: int,
                       tasks: List[str]) -> None:
    """Collective: every rank joins; if any rank saw a non-finite loss (first_bad < steps), all raise naming the
    first bad step."""
    mine = int(first_bad)
    if any_rank(mine < steps):
        step = agree_min(mine)
        worst = [t for t, bad in zip(tasks, first_bad_tasks.tolist()) if bad] if mine < steps else []
        raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {step}, task(s) {worst or '(other rank)'}"
                                 ": lower train.lr / train.sparse_lr; the last good checkpoint is kept")


FAULT_ENV = "PIMM_FAULT_INJECT"


def _fault_injection() -> Optional[Dict[str, Any]]:
    """Test hook: when $PIMM_FAULT_INJECT names a JSON file {"epoch": E, "step": S, "rank": R}, rank R's process
    kills itself with SIGKILL at that step — a real process death, as when a machine is lost. The file is consumed
    first, so the restarted worker group runs through. With "kind": "nan" and "task": T, rank R's labels of task T
    are NaN at that step instead (a diverging loss)."""
    path = os.environ.get(FAULT_ENV)
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        spec = json.load(f)
    return {**spec, "path": path}


def _kill_self(fault: Dict[str, Any]) -> None:
    try:
        os.remove(fault["path"])
    except FileNotFoundError:
        return  # already consumed by an earlier attempt
    print(f"[pimm] fault injection: killing rank {fault['rank']} (pid {os.getpid()}) at epoch {fault['epoch']} "
          f"step {fault['step']}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _report_checkpoint(dmp, optimizer, state: Dict[str, Any], epoch: int, metrics: Dict[str, Any], store: str,
                       dist_rank_zero: bool) -> None:
    """Every rank writes its shards to a local folder; Ray merges them into <storage>/epoch_XXX. A folder of that
    name left half-uploaded by a crashed attempt is removed first, so two attempts' files never mix."""
    stale = storage.join(store, checkpoint_name(epoch))
    if dist_rank_zero and not storage.is_uri(stale) and os.path.isdir(stale):
        shutil.rmtree(stale, ignore_errors=True)
    barrier()
    local = tempfile.mkdtemp(prefix="pimm-ckpt-")
    try:
        save_checkpoint(local, dmp, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=checkpoint_name(epoch))
        # report() returns on each rank once ITS files are uploaded; a rank that reads the merged checkpoint next
        # (the best epoch, at the end) must wait until every rank's upload is complete.
        barrier()
    finally:
        shutil.rmtree(local, ignore_errors=True)


@torch.no_grad()
def _reference_batch(dmp, reader: ShardReader, device: torch.device) -> Dict[str, torch.Tensor]:
    """One real test batch and the sharded model's eval probabilities for it (collective: all ranks run it)."""
    dmp.eval()
    batch = next(iter(reader.iter_eval(1)))
    _, (_, logits, _, weights) = dmp(batch.to(device))
    logits, weights = logits.cpu(), weights.cpu()
    keep = weights > 0
    kjt = batch.features
    ref = {"values": kjt.values(), "lengths": kjt.lengths(), "keys": list(kjt.keys()),
           "probs": torch.sigmoid(logits.float()), "keep": keep}
    if kjt.weights_or_none() is not None:
        ref["weights"] = kjt.weights()
    return ref


__all__ = ["train_loop_per_worker", "read_train_state", "checkpoint_name", "METRICS_FILE", "EXPORT_REFERENCE_FILE"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("launch/worker.py is run by Ray Train; start training with launch/train.py")
