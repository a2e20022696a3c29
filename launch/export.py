"""Export a finished run: the best checkpoint (sharded, DCP) -> one unsharded TorchScript `model.pt` + `model.json`.

    python launch/export.py RUN_DIR [--checkpoint epoch_002]

The artifact loads with `torch.jit.load` alone (no torchrec, no ray): pure-torch EmbeddingBags + the model's head.
It is checked against the reference batch the trainer scored with the sharded model (max abs difference <= 1e-6);
a mismatch is an error, never a silently wrong model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Dict, Optional

import torch
import yaml

from data_pipeline.spec import DatasetSpec
from distributed import storage
from distributed.checkpoint import load_unsharded
from launch.config import config_from_dict
from launch.worker import EXPORT_REFERENCE_FILE, METRICS_FILE
from pimm_model.export import export_torchscript, inference_model_from_state
from pimm_model.model import MultiTaskTrain, build_model

MODEL_FILE = "model.pt"
MODEL_CARD = "model.json"
EXPORT_TOLERANCE = 1e-6


def export_run(run_dir: str, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        metrics = json.load(f)
    # the best checkpoint may belong to the run this one resumed from: use the recorded path
    ckpt = os.path.join(run_dir, checkpoint) if checkpoint else metrics["best_checkpoint"]
    spec = DatasetSpec.load(cfg.data.path)
    fields = [(f.name, f.num_embeddings) for f in spec.fields]

    plain = MultiTaskTrain(build_model(cfg.model, fields, len(spec.labels), embedding_device=torch.device("cpu")))
    local, downloaded = storage.local_copy(ckpt)  # the checkpoint may be on s3:// or gs://
    try:
        load_unsharded(local, plain)
    finally:
        if downloaded:
            shutil.rmtree(local, ignore_errors=True)
    inference = inference_model_from_state(cfg.model, fields, len(spec.labels), plain.model.state_dict())
    path = os.path.join(run_dir, MODEL_FILE)
    export_torchscript(inference, path)

    diff = _check_against_reference(path, os.path.join(run_dir, EXPORT_REFERENCE_FILE)) if checkpoint is None else None
    card = {
        "model": cfg.model.name, "tasks": spec.labels,
        "fields": [{"name": f.name, "num_embeddings": f.num_embeddings, "multi_valued": f.multi_valued}
                   for f in spec.fields],
        "inputs": {"forward": "ids: int64 (B, F), one id per field in `fields` order -> probabilities (B, T)",
                   "forward_jagged": "values: int64 (N,), lengths: int (F*B,) field-major (all rows of field 0 "
                                     "first) -> probabilities (B, T)"},
        "outputs": "probabilities (B, T), column t = tasks[t] (marginal P(task t positive | impression))",
        "checkpoint": ckpt, "export_max_abs_diff": diff, "data_spec": spec.root, "spec_meta": spec.meta,
    }
    with open(os.path.join(run_dir, MODEL_CARD), "w") as f:
        json.dump(card, f, indent=1)
    return card


def _check_against_reference(model_path: str, reference_path: str) -> float:
    ref = torch.load(reference_path, weights_only=True)
    scripted = torch.jit.load(model_path)
    with torch.no_grad():
        probs = scripted.forward_jagged(ref["values"], ref["lengths"])
    keep = ref["keep"]
    diff = float((probs[keep] - ref["probs"][keep]).abs().max()) if bool(keep.any()) else 0.0
    if not diff <= EXPORT_TOLERANCE:
        raise RuntimeError(f"exported {model_path} differs from the trained model by {diff:.3g} "
                           f"(> {EXPORT_TOLERANCE}) on the reference batch {reference_path}: refusing a wrong model")
    return diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", help="checkpoint folder name inside RUN_DIR (default: the best epoch)")
    args = ap.parse_args(argv)
    card = export_run(args.run_dir, args.checkpoint)
    print(json.dumps({k: card[k] for k in ("model", "tasks", "checkpoint", "export_max_abs_diff")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
