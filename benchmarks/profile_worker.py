"""Where a trainer worker's time goes: py-spy on one Ray train worker of a real `launch/train.py` run.

    python benchmarks/profile_worker.py                     # 200k rows, 8 epochs, samples 20 s of training
    python benchmarks/profile_worker.py --native --seconds 15 --out /tmp/worker.raw

Starts the trainer (--workers Ray workers on the synthetic data), waits until one worker is inside its training loop
(`_train_epoch`, found with `py-spy dump`), then records --seconds of that worker with `py-spy record --idle
--threads --format raw` (idle samples included: time blocked in a gloo collective is idle to the OS but is wall time
of the step). Only samples of the main thread inside `_train_epoch` are kept; the table gives, per phase and per
function, the share of those samples that include it (inclusive wall-clock share of the training loop). Needs py-spy
(`pip install py-spy`; it is in this project's .venv) and ptrace rights over the worker processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402

# phase -> substrings of a frame ("function (file:line)") that put a sample in it; first match wins, in this order
PHASES = [
    ("input: reader (Parquet -> KJT batch)", ("iter_train (", "_stream (", "_to_batch (", "_read (")),
    ("NaN check all-reduce (any_rank)", ("any_rank (",)),
    ("progress print / .item()", ("_say (",)),
    ("optimizer.zero_grad", ("zero_grad (",)),
    ("optimizer.step (dense Adam)", ("step (", )),
    ("backward (incl. DDP all-reduce, fused emb. update, sparse grad all-to-all)", ("backward (",)),
    ("forward: sparse input dist (KJT all-to-all)", ("input_dist (", "_wait_impl (", "_fetch_output_dist")),
    ("forward: rest (embedding lookup, output dist, towers, loss)", ("forward (", "_call_impl (")),
]


def find_workers(root: int):
    return [p for p in C.descendants(root) if "RayTrainWorker" in C.proc_cmdline(p)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(ap, rows=200_000)
    C.add_trainer_args(ap, epochs=8)
    ap.add_argument("--batch-size", type=int, default=None, help="per-worker batch (default: the config's)")
    ap.add_argument("--seconds", type=float, default=20, help="seconds to record (default 20)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--native", action="store_true", help="also C/C++ frames (py-spy --native; slower)")
    ap.add_argument("--top", type=int, default=25, help="functions to list (default 25)")
    ap.add_argument("--out", default=None, help="keep the raw (collapsed-stack) py-spy output here")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        ap.error("py-spy not found: pip install py-spy")
    data = C.data_from_args(args)
    bs = args.batch_size or C.default_config().train.batch_size
    env = C.env_info()
    C.print_env(env)
    run_dir = tempfile.mkdtemp(prefix="pimm-bench-prof-")
    raw = args.out or os.path.join(run_dir, "..", os.path.basename(run_dir) + ".raw")
    cmd = [sys.executable, os.path.join(C.REPO, "launch", "train.py"), f"data.path={data}", f"run.dir={run_dir}",
           "wandb.mode=disabled", *C.trainer_overrides(bs, args.workers, args.epochs, args.trainer_arg)]
    envv = dict(os.environ, PYTHONUNBUFFERED="1")
    envv.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=C.REPO, env=envv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker, deadline = None, time.time() + 300
        while worker is None and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            for pid in find_workers(proc.pid):
                dump = subprocess.run([pyspy, "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
                if "_train_epoch" in dump:
                    worker = pid
                    break
        if worker is None:
            raise RuntimeError("no worker reached its training loop (trainer failed or too slow)")
        print(f"# recording worker pid {worker} for {args.seconds:.0f} s", flush=True)
        rec = [pyspy, "record", "--pid", str(worker), "--duration", str(int(args.seconds)), "--rate", str(args.rate),
               "--format", "raw", "--idle", "--threads", "--output", raw]
        # py-spy refuses --native with --nonblocking (native unwinding needs the process paused)
        rec.append("--native" if args.native else "--nonblocking")
        subprocess.run(rec, capture_output=True, text=True, check=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(run_dir, ignore_errors=True)

    loop, phases, funcs = 0, Counter(), Counter()
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if not any(fr.startswith("_train_epoch (") for fr in frames):
                continue
            n = int(n)
            loop += n
            below = frames[next(i for i, fr in enumerate(frames) if fr.startswith("_train_epoch (")) + 1:]
            for name, keys in PHASES:
                if any(any(k in fr for k in keys) for fr in below):
                    phases[name] += n
                    break
            else:
                phases["other (loop body)"] += n
            for fr in set(fr.split(" (")[0] + " (" + fr.split(" (")[1].split(":")[0] + ")" if " (" in fr else fr
                          for fr in below):
                funcs[fr] += n
    if not loop:
        raise RuntimeError(f"no samples inside _train_epoch in {raw}")
    C.print_table([{"phase": k, "share of loop wall time": v / loop} for k, v in phases.most_common()],
                  title=f"one worker's training loop, {loop} samples ({args.workers} workers, batch {bs})")
    C.print_table([{"function (file)": k, "inclusive share": v / loop} for k, v in funcs.most_common(args.top)],
                  title="functions by inclusive share of the loop's samples")
    print(f"# raw py-spy samples: {raw}")
    load = C.print_load_end(env)
    C.write_json(args.json, "profile_worker", args, env, load,
                 {"samples": loop, "phases": {k: v / loop for k, v in phases.items()},
                  "functions": {k: v / loop for k, v in funcs.most_common(args.top)}, "raw": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
