"""One optimizer step of the default model's parameters, per torch implementation (for-loop default, foreach, fused):
what `distributed/optim.py:fused_kwargs` buys on this CPU.

    python benchmarks/optimizer_step.py [--threads 1] [--reps 5] [--steps 100] [--json out.json]

Dense Adam on the default model's dense layers (towers, attention, PIM: build_model, launch/configs/default.yaml) and
Adagrad on its embedding tables (the replicated tables' optimizer), with random gradients; microseconds per step,
median of --reps timings of --steps steps each, the variants interleaved. --threads 1 is a trainer worker's setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402

IMPLEMENTATIONS = {"default (for-loop on CPU)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(ap, rows=200_000)  # the data set only sets the tables' sizes (the default synthetic one)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as a worker)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from pimm_model.model import build_model

    _, spec, cfg, _, env = C.bench_setup(args, args.threads)
    model = build_model(cfg.model, C.spec_fields(spec), len(spec.labels), embedding_device=torch.device("cpu"))
    groups = {"Adam, dense layers": (torch.optim.Adam, {"lr": cfg.train.lr},
                                     [p for n, p in model.named_parameters() if "embedding_bags" not in n]),
              "Adagrad, tables": (torch.optim.Adagrad, {"lr": cfg.train.sparse_lr},
                                  [p for n, p in model.named_parameters() if "embedding_bags" in n])}
    torch.manual_seed(0)
    for _, _, params in groups.values():
        for p in params:
            p.grad = torch.randn_like(p)
    opts = {(g, impl): cls(params, **kw, **extra)
            for g, (cls, kw, params) in groups.items() for impl, extra in IMPLEMENTATIONS.items()}
    for opt in opts.values():  # warm-up: lazy state, kernels
        for _ in range(5):
            opt.step()
    times = {k: [] for k in opts}
    for _ in range(args.reps):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[k].append((time.perf_counter() - t0) / args.steps * 1e6)
    rows = []
    for g, (_, _, params) in groups.items():
        base = C.median(times[(g, "default (for-loop on CPU)")])
        for impl in IMPLEMENTATIONS:
            us = C.median(times[(g, impl)])
            rows.append({"optimizer": g, "tensors": len(params), "elements": sum(p.numel() for p in params),
                         "implementation": impl, "us/step (median)": us, "vs default": base / us})
    C.print_table(rows, title=f"optimizer step, {args.threads} thread(s), median of {args.reps} x {args.steps} steps")
    load = C.print_load_end(env)
    C.write_json(args.json, "optimizer_step", args, env, load, {"rows": rows, "times_us": {
        f"{g} / {impl}": v for (g, impl), v in times.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
