"""The GPU check of issue #6: the trainer on one GPU (nccl, row-wise sharding, fused Adam on the tables) vs the same
model on the same GPU in one plain process on pre-built batches (the roofline), side by side in one run.

    bash benchmarks/gpu_check.sh                     # installs the GPU stack, then runs this with its defaults
    python benchmarks/gpu_check.py --device cpu --rows 20000 --skip-trainer     # what CI can run (smoke test)

Prints the GPU's name, the roofline's and the trainer's samples/s (medians of --reps), and trainer / roofline.
The trainer's rate is metrics.json's per-epoch training samples/s (evaluation excluded), median over epochs after the
first. The roofline: build_model + MultiTaskTrain, the tables in torchrec's FusedEmbeddingBagCollection with the
trainer's GPU sparse optimizer (Adam) and Adam on the dense layers, batches read by the project's reader and moved
to the device before timing, a device synchronize around the timed steps.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(ap, rows=1_000_000)
    C.add_trainer_args(ap, epochs=3)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of this script)")
    ap.add_argument("--batch-size", type=int, default=8192, help="per-worker (= roofline) batch (default 8192)")
    ap.add_argument("--steps", type=int, default=60, help="timed roofline steps per repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--sharding", default="row_wise", help="the trainer's train.sharding_types (default row_wise)")
    ap.add_argument("--skip-trainer", action="store_true", help="roofline only")
    ap.add_argument("--json", help="write the results here")
    ap.set_defaults(workers=1)
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU: install the GPU stack (bash benchmarks/gpu_check.sh) or use "
                 "--device cpu")
    env = C.env_info()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    C.print_env(env)
    print(f"# device: {env['device']}", flush=True)
    data = C.data_from_args(args)
    from data_pipeline.spec import DatasetSpec

    spec = DatasetSpec.load(data)
    cfg = C.default_config()
    batches = [b.to(device) for b in C.prebuilt_batches(spec, args.batch_size, args.steps + 3)]
    module, opts = C.build_single_process(cfg.model, spec, "fused", cfg.train.lr, cfg.train.sparse_lr, device=device)
    C.train_steps_rate(module, opts, batches[:4], warmup=0)  # untimed: allocations, kernels, optimizer state
    gpu = device.type == "cuda"
    overrides = [f"train.use_gpu={'true' if gpu else 'false'}", f"train.sharding_types=[{args.sharding}]",
                 *args.trainer_arg]
    roof, trainer, runs = [], [], []
    for rep in range(args.reps):
        roof.append(C.train_steps_rate(module, opts, batches))
        line = f"# rep {rep + 1}/{args.reps}: roofline {roof[-1]:,.0f} samples/s"
        if not args.skip_trainer:
            run = C.run_trainer(data, C.trainer_overrides(args.batch_size, args.workers, args.epochs, overrides))
            runs.append(run)
            trainer.append(run["samples_per_s"])
            line += f", trainer {trainer[-1]:,.0f} (plan {run['sharding_plan']})"
        print(line, flush=True)
    rows = [{"variant": f"roofline: one process on {env['device']}, B={args.batch_size}",
             "samples/s (median)": C.median(roof), "min..max": C.spread(roof)}]
    results = {"device": env["device"], "batch_size": args.batch_size, "roofline": roof, "trainer": trainer,
               "trainer_overrides": overrides}
    if trainer:
        ratio = C.median(trainer) / C.median(roof)
        rows.append({"variant": f"trainer: {args.workers} worker(s), {' '.join(overrides)}",
                     "samples/s (median)": C.median(trainer), "min..max": C.spread(trainer)})
        results["trainer_over_roofline"] = ratio
        results["runs"] = runs
    C.print_table(rows, title=f"GPU check on {env['device']} (training samples/s)")
    if trainer:
        print(f"trainer / roofline = {results['trainer_over_roofline']:.2f}", flush=True)
    load = C.print_load_end(env)
    C.write_json(args.json, "gpu_check", args, env, load, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
