"""Shared helpers of the benchmark scripts: environment report, tables, JSON, benchmark data, trainer runs, and the
single-process ("roofline") model.

Every benchmark measures the variants it compares side by side in ONE invocation, interleaved (A, B, A, B, ...), and
reports medians of several repetitions and ratios: the machines these run on are shared and noisy, so absolute
numbers are only indicative, the ratios are the result.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the scripts are run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, REPO)

DEFAULT_CACHE = os.path.join(REPO, ".cache", "pimm-data")
BENCH_CACHE = os.path.join(REPO, ".cache", "pimm-bench")


# ----------------------------------------------------------------------------------------------- environment


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def env_info() -> Dict[str, Any]:
    """Machine, thread settings, versions and load: printed with every table."""
    import numpy
    import pyarrow
    import torch

    info: Dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "pyarrow_cpu_count": pyarrow.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "loadavg": list(os.getloadavg()),
        "cpu_pressure": cpu_pressure(),
    }
    for mod in ("torchrec", "fbgemm_gpu", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark on a missing optional package
            info[mod] = f"unavailable ({type(e).__name__})"
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "launch", "distributed", "pimm_model",
                 "data_pipeline")
    info["git"] = head + (" (trainer sources modified)" if dirty else "")
    return info


def cpu_pressure() -> Optional[Dict[str, float]]:
    """Linux PSI: the share of time some runnable task waited for a CPU (avg10/avg60/avg300, percent); the best
    single noise indicator on a shared machine. None where /proc/pressure is absent."""
    try:
        with open("/proc/pressure/cpu") as f:
            first = f.readline().split()
        return {k: float(v) for k, v in (x.split("=") for x in first[1:4])}
    except (OSError, ValueError):
        return None


def _psi(p: Optional[Dict[str, float]]) -> str:
    return "n/a" if not p else f"{p['avg10']:.0f}%/{p['avg60']:.0f}%/{p['avg300']:.0f}%"


def print_env(info: Dict[str, Any], title: str = "environment") -> None:
    la = info["loadavg"]
    print(f"# {title}: {info['cores']} cores ({info['cores_usable']} usable), torch threads {info['torch_threads']}, "
          f"pyarrow cpu_count {info['pyarrow_cpu_count']}, {info['mem_total_gib']} GiB RAM; python {info['python']}, "
          f"torch {info['torch']}, torchrec {info['torchrec']}, fbgemm_gpu {info['fbgemm_gpu']}, ray {info['ray']}, "
          f"pyarrow {info['pyarrow']}; git {info['git']}; load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; "
          f"CPU pressure (PSI some, 10s/60s/300s) {_psi(info['cpu_pressure'])}",
          flush=True)


def print_load_end(info_start: Dict[str, Any]) -> Dict[str, Any]:
    la = list(os.getloadavg())
    s = info_start["loadavg"]
    psi = cpu_pressure()
    print(f"# load average at start {s[0]:.2f} {s[1]:.2f} {s[2]:.2f}, at end {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} "
          "(1/5/15 min; our own runs add up to the core count, more means other work shared the machine); CPU "
          f"pressure at start {_psi(info_start['cpu_pressure'])}, at end {_psi(psi)}", flush=True)
    return {"loadavg_start": s, "loadavg_end": la, "cpu_pressure_end": psi}


# ------------------------------------------------------------------------------------------------ statistics


def median(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs]
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """'min..max' of the repetitions, to show the noise next to a median."""
    xs = [float(x) for x in xs]
    return f"{_fmt(min(xs))}..{_fmt(max(xs))}" if xs else ""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    return str(v)


def print_table(rows: List[Dict[str, Any]], columns: Optional[List[str]] = None, title: str = "") -> None:
    """A small aligned text table; floats formatted for reading (JSON keeps the full values)."""
    if not rows:
        return
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns]
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n## {title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def write_json(path: Optional[str], name: str, args: Any, env_start: Dict[str, Any], load: Dict[str, Any],
               results: Dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = {"benchmark": name, "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
           "params": vars(args), "env": env_start, **load, "results": results,
           "note": "shared, noisy machine: compare the ratios, not the absolute rates"}
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"# wrote {path}", flush=True)


def timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------ data


def default_config(overrides: Sequence[str] = ()):
    """launch/configs/default.yaml (the demo's model sizes and batch size) with ``key=value`` overrides."""
    from launch.config import load_config

    return load_config(None, list(overrides))


def bench_data(rows_train: int, rows_valid: int = 20_000, rows_test: int = 20_000, cache_dir: Optional[str] = None,
               rows_per_file: Optional[int] = None, row_group_rows: Optional[int] = None,
               fields: Optional[Dict[str, int]] = None) -> str:
    """The default config's synthetic data set with the given row counts (generated once, then cached; the train
    split of a given seed does not depend on the sizes of the other splits)."""
    from data_pipeline.synthetic import ensure_dataset

    syn = default_config().data.synthetic
    syn = replace(syn, rows_train=rows_train, rows_valid=rows_valid, rows_test=rows_test)
    # every split needs a file per worker (workers read whole files): at least 2 files in the smallest split
    smallest = min(n for n in (rows_train, rows_valid, rows_test) if n > 0)
    rows_per_file = rows_per_file or min(syn.rows_per_file, max(1, smallest // 2))
    syn = replace(syn, rows_per_file=rows_per_file, row_group_rows=row_group_rows or min(syn.row_group_rows,
                                                                                         rows_per_file))
    if fields:
        syn = replace(syn, fields=dict(fields))
    return ensure_dataset(syn, cache_dir or DEFAULT_CACHE)


def bench_setup(args, threads: int):
    """What every benchmark does first: its data set (generated once), spec, default config, per-worker batch
    (``args.batch_size`` or the config's), torch intra-op threads, and the environment, printed.
    Returns (data path, spec, config, per-worker batch, environment)."""
    import torch

    from data_pipeline.spec import DatasetSpec

    data = data_from_args(args)
    spec = DatasetSpec.load(data)
    cfg = default_config()
    per_worker = getattr(args, "batch_size", None) or cfg.train.batch_size
    torch.set_num_threads(threads)
    env = env_info()
    print_env(env)
    return data, spec, cfg, per_worker, env


def add_data_args(ap, rows: int, rows_eval: int = 20_000) -> None:
    ap.add_argument("--rows", type=int, default=rows, help=f"train rows of the synthetic data set (default {rows})")
    ap.add_argument("--rows-eval", type=int, default=rows_eval, help="rows of the valid and of the test split")
    ap.add_argument("--rows-per-file", type=int, default=None, help="rows per shard file (default: the config's)")
    ap.add_argument("--row-group-rows", type=int, default=None, help="rows per Parquet row group")
    ap.add_argument("--cache-dir", default=None, help=f"where generated data sets are cached (default {DEFAULT_CACHE})")
    ap.add_argument("--data", default=None, help="use this data folder (spec.json + shards) instead of generating")


def data_from_args(args) -> str:
    if args.data:
        return os.path.abspath(args.data)
    return bench_data(args.rows, args.rows_eval, args.rows_eval, args.cache_dir, args.rows_per_file,
                      args.row_group_rows)


# -------------------------------------------------------------------------------------- process memory (/proc)


def _children_map() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(pid: int) -> List[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def proc_status_kb(pid: int, key: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class PeakRssWatcher:
    """Polls VmHWM (the kernel's peak resident set size of a process) of a process tree until it ends. VmHWM only
    grows, so polling every ``interval`` seconds misses at most what a process allocates in its last interval.
    Ray train workers are recognised by their process title (``ray::RayTrainWorker...``)."""

    def __init__(self, root_pid: int, interval: float = 0.5):
        self.root = root_pid
        self.interval = interval
        self.peak_kb: Dict[int, int] = {}
        self.title: Dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRssWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        for pid in [self.root, *descendants(self.root)]:
            hwm = proc_status_kb(pid, "VmHWM")
            if hwm is None:
                continue
            self.peak_kb[pid] = max(hwm, self.peak_kb.get(pid, 0))
            title = proc_cmdline(pid)
            if "RayTrainWorker" in title or pid not in self.title:
                self.title[pid] = title

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def workers_mb(self) -> List[float]:
        return sorted((round(kb / 1024, 1) for pid, kb in self.peak_kb.items()
                       if "RayTrainWorker" in self.title.get(pid, "")), reverse=True)

    def root_mb(self) -> float:
        return round(self.peak_kb.get(self.root, 0) / 1024, 1)


# ----------------------------------------------------------------------------------------------- trainer runs


def dir_mb(path: str) -> float:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return round(total / 2**20, 1)


def trainer_rate(epochs: List[Dict[str, Any]], skip_first: bool = True) -> float:
    """Median per-epoch training samples/s (metrics.json; evaluation excluded), without epoch 0 (warm-up) when
    there are later epochs."""
    rates = [e["samples_per_s"] for e in epochs]
    if skip_first and len(rates) > 1:
        rates = rates[1:]
    return median(rates)


def run_trainer(data_path: str, overrides: Sequence[str], timeout: float = 3600, keep_dir: bool = False,
                quiet: bool = True, repo: Optional[str] = None) -> Dict[str, Any]:
    """`launch/train.py` in a subprocess (its own Ray) on ``data_path``; W&B disabled, a temporary run folder.
    Returns the wall time, metrics.json, the per-epoch training samples/s, the peak RSS of every Ray train worker
    and of the driver (VmHWM polled), and the size of the run folder (checkpoints + model.pt).
    ``repo``: run the trainer of another checkout (e.g. a git worktree of an older commit, for before/after
    ratios measured side by side); its packages come first on PYTHONPATH, ahead of this venv's editable install."""
    repo = os.path.abspath(repo or REPO)
    run_dir = tempfile.mkdtemp(prefix="pimm-bench-run-")
    cmd = [sys.executable, os.path.join(repo, "launch", "train.py"), f"data.path={data_path}", f"run.dir={run_dir}",
           "wandb.mode=disabled", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true", RAY_DEDUP_LOGS="0")
    if repo != REPO:
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)  # always a private local Ray, never a cluster someone else is using
    log_path = os.path.join(run_dir, "..", os.path.basename(run_dir) + ".log")
    elapsed = timer()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        with PeakRssWatcher(proc.pid) as watch:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    wall = elapsed()
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    os.remove(log_path)
    metrics_path = os.path.join(run_dir, "metrics.json")
    if rc != 0 or not os.path.exists(metrics_path):
        shutil.rmtree(run_dir, ignore_errors=True)
        raise RuntimeError(f"trainer run failed (rc={rc}): {' '.join(cmd)}\n{log_text[-4000:]}")
    with open(metrics_path) as f:
        metrics = json.load(f)
    out = {
        "wall_s": wall,
        "epochs": [{"samples_per_s": e["samples_per_s"], "epoch_seconds": e["epoch_seconds"]}
                   for e in metrics["epochs"]],
        "train_seconds": sum(e["epoch_seconds"] for e in metrics["epochs"]),
        "samples_per_s": trainer_rate(metrics["epochs"]),
        "worker_peak_rss_mb": watch.workers_mb(),
        "driver_peak_rss_mb": watch.root_mb(),
        "run_dir_mb": dir_mb(run_dir),
        "sharding_plan": metrics.get("sharding_plan"),
        "world_size": metrics.get("world_size"),
        "peak_rss_mb_from_metrics": metrics.get("peak_rss_mb"),  # each rank's ru_maxrss, recorded by the trainer
    }
    if keep_dir:
        out["run_dir"] = run_dir
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    if not quiet:
        print(log_text[-2000:])
    return out


def trainer_overrides(batch_size: int, workers: int, epochs: int, extra: Sequence[str] = ()) -> List[str]:
    return [f"train.batch_size={batch_size}", f"train.num_workers={workers}", f"train.epochs={epochs}",
            f"train.patience={epochs + 1}", "train.log_every=1000000", *extra]


def add_trainer_args(ap, epochs: int = 4) -> None:
    ap.add_argument("--workers", type=int, default=2, help="Ray workers of the full trainer (default 2)")
    ap.add_argument("--epochs", type=int, default=epochs,
                    help=f"trainer epochs per run; the rate is the median over epochs after the first ({epochs})")
    ap.add_argument("--trainer-arg", action="append", default=[],
                    help="extra key=value override for launch/train.py (repeatable)")


# -------------------------------------------------------------------------- the single-process model (roofline)


def spec_fields(spec) -> List[Tuple[str, int]]:
    return [(f.name, int(f.num_embeddings)) for f in spec.fields]


def prebuilt_batches(spec, batch_size: int, steps: int, seed: int = 0) -> list:
    """``steps`` Batches (KJT + labels) of the train split, read once by the project's reader and kept in memory."""
    from data_pipeline.reader import ShardReader

    reader = ShardReader(spec, spec.files("train"), batch_size, shuffle=True, seed=seed)
    n = min(steps, reader.num_full_batches())
    if n < 1:
        raise ValueError(f"the train split ({reader.num_rows()} rows) holds no full batch of {batch_size}")
    return list(reader.iter_train(0, n))


ROOFLINE_KINDS = {
    "fused": "EBC replaced by torchrec FusedEmbeddingBagCollection with fbgemm EXACT_ROWWISE_ADAGRAD "
             "(the trainer's own CPU kernel, update inside backward) + torch.optim.Adam(fused) on the dense layers",
    "ebc_adagrad": "build_model's plain torchrec EmbeddingBagCollection (dense gradients) + torch.optim.Adagrad "
                   "(fused) on the tables + torch.optim.Adam(fused) on the dense layers",
}


def build_single_process(model_cfg, spec, kind: str, lr: float = 1e-3, sparse_lr: float = 0.02, seed: int = 0,
                         device=None):
    """The trainer's model (build_model + MultiTaskTrain, same sizes) in one plain process, no sharding, no process
    group, on ``device`` (default CPU). Returns (train module, [optimizers]). The fused kind uses the trainer's
    default sparse optimizer of that device: row-wise Adagrad on CPU, Adam on a GPU."""
    import torch

    from distributed.optim import fused_kwargs  # the trainer's optimizer kernels (fused where torch has them)
    from pimm_model.model import MultiTaskTrain, build_model

    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    module = MultiTaskTrain(build_model(model_cfg, spec_fields(spec), len(spec.labels), weighted=spec.weighted))
    module.set_p(0.5)  # the PIM draws its label mask whatever p is: p does not change the cost
    module.to(device)
    emb = module.model.embedding
    if kind == "fused":
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        sparse_cls = RowWiseAdagrad if device.type == "cpu" else torch.optim.Adam
        emb.ebc = FusedEmbeddingBagCollection(emb.ebc.embedding_bag_configs(), sparse_cls, {"lr": sparse_lr},
                                              device=device)
        dense = [p for n, p in module.named_parameters() if ".ebc." not in n]
        return module, [torch.optim.Adam(dense, lr=lr, **fused_kwargs(dense))]
    if kind == "ebc_adagrad":
        dense = [p for n, p in module.named_parameters() if ".ebc." not in n]
        tables = [p for n, p in module.named_parameters() if ".ebc." in n]
        return module, [torch.optim.Adam(dense, lr=lr, **fused_kwargs(dense)),
                        torch.optim.Adagrad(tables, lr=sparse_lr, **fused_kwargs(tables))]
    raise ValueError(f"unknown single-process model kind {kind!r}; one of {sorted(ROOFLINE_KINDS)}")


def train_step(module, optimizers, batch) -> None:
    """One forward + backward + optimizer step of a MultiTaskTrain module (the single-process reference)."""
    for o in optimizers:
        o.zero_grad()
    loss, _ = module(batch)
    loss.backward()
    for o in optimizers:
        o.step()


def train_steps_rate(module, optimizers, batches: list, warmup: int = 3) -> float:
    """samples/s of forward + backward + optimizer step over the pre-built batches (after ``warmup`` steps)."""
    def step(batch) -> None:
        train_step(module, optimizers, batch)

    module.train()
    warmup = min(warmup, max(len(batches) - 1, 0))
    for b in batches[:warmup]:
        step(b)
    timed = batches[warmup:]
    sync = _device_sync(batches[0].labels.device if batches else None)
    sync()
    elapsed = timer()
    for b in timed:
        step(b)
    sync()  # a GPU runs asynchronously: time the work, not its launch
    return sum(b.batch_size for b in timed) / max(elapsed(), 1e-9)


def _device_sync(device) -> Callable[[], None]:
    if device is not None and device.type == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None

