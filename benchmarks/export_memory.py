"""Where the export's memory goes: `launch/export.py`'s `export_run` on a finished run folder, in this process, with
the peak RSS of each phase (the kernel's VmHWM, reset between phases through /proc/self/clear_refs, so a spike inside
a C call that holds the GIL is counted too; a sampling thread would miss it) and its seconds.

    python benchmarks/export_memory.py RUN_DIR [--parity-rows 20000] [--no-program] [--json out.json]

RUN_DIR: a run folder of `launch/train.py` (e.g. one kept from `benchmarks/big_tables.py --keep-run`). The export
rewrites RUN_DIR's model.pt / model.pt2 / model.json (the same files: same checkpoint, same code; with --no-program
model.pt2 is removed). Linux only.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--parity-rows", type=int, default=20_000, help="test rows of the parity check (default 20k)")
    ap.add_argument("--no-program", action="store_true", help="export model.pt only (run.export_program=false)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch

    import launch.export as E
    import pimm_model.export as PE

    phases = []

    def timed(owner, name: str, label: str):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            _reset_peak()
            start_mb, t0 = _status_mb("VmRSS"), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases.append({"phase": label, "seconds": time.perf_counter() - t0, "RSS before MB": start_mb,
                               "peak MB": _status_mb("VmHWM"), "RSS after MB": _status_mb("VmRSS")})
                print(f"# {label}: {phases[-1]['seconds']:.1f} s, peak {phases[-1]['peak MB']:,.0f} MB", flush=True)

        setattr(owner, name, wrapper)
        return fn

    # the calls export_run makes, in its order (patched where export_run looks them up)
    originals = [(E, "build_model", timed(E, "build_model", "build the unsharded model")),
                 (E, "load_unsharded", timed(E, "load_unsharded", "load the checkpoint (DCP)")),
                 (E, "inference_model_from_state", timed(E, "inference_model_from_state", "inference model")),
                 (E, "export_torchscript", timed(E, "export_torchscript", "script + save model.pt")),
                 (torch.export, "export", timed(torch.export, "export", "torch.export.export")),
                 (torch.export, "save", timed(torch.export, "save", "torch.export.save model.pt2")),
                 (torch.jit, "load", timed(torch.jit, "load", "torch.jit.load model.pt")),
                 (torch.export, "load", timed(torch.export, "load", "torch.export.load model.pt2")),
                 (E, "whole_split_parity", timed(E, "whole_split_parity", "parity (one artifact)"))]
    assert PE.torch is torch  # export_program calls torch.export.export / save through this module
    env = C.env_info()
    C.print_env(env)
    _reset_peak()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    try:
        card = E.export_run(args.run_dir, parity_rows=args.parity_rows, progress=False, program=not args.no_program)
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    total = time.perf_counter() - t0
    tables_mb = os.path.getsize(os.path.join(args.run_dir, "model.pt")) / 2**20
    C.print_table(phases, ["phase", "seconds", "RSS before MB", "peak MB", "RSS after MB"],
                  title=f"export of {args.run_dir}: {total:.0f} s; process RSS before {base:,.0f} MB; "
                        f"model.pt {tables_mb:,.0f} MiB (≈ the tables)")
    worst = max(phases, key=lambda p: p["peak MB"])
    print(f"\npeak {worst['peak MB']:,.0f} MB in '{worst['phase']}' = {worst['peak MB'] / tables_mb:.2f}x model.pt; "
          f"parity max abs diff {card['export_max_abs_diff']:.2e}")
    load = C.print_load_end(env)
    C.write_json(args.json, "export_memory", args, env, load,
                 {"phases": phases, "total_s": total, "base_rss_mb": base, "model_pt_mib": tables_mb})
    return 0


if __name__ == "__main__":
    sys.exit(main())
