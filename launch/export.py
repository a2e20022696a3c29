"""Export a finished run: the best checkpoint (sharded, DCP) -> the serving artifact beside it.

    python launch/export.py RUN_DIR [--checkpoint epoch_002] [--parity-rows N] [--no-program]

Writes, into RUN_DIR (each file to a temporary name first, moved into place only once every check passed):

- ``model.pt``   TorchScript ``ServingModel`` (pimm_model/export.py): RAW feature values in, the vocabulary / hashing
  of data preparation applied inside, ``{task: probability}`` out. Loads with ``torch.jit.load`` or libtorch alone.
- ``model.pt2``  the same model as a ``torch.export`` program (``torch.export.load(...).module()``), on the dense
  (B, F) raw entry (not with ``--no-program`` / ``run.export_program=false``).
- ``model.json`` the card: format version, tasks in chain order, fields in input order with their value types and
  encodings, the input contract, training config and metrics, sha256 of both files, the torch version, parity.

Checks (a mismatch above 1e-6 is an error, never a silently wrong model):

1. the reference batch the trainer scored with the SHARDED model (``export_reference.pt``) -> ``model.pt`` on indices;
2. the WHOLE test split, streamed from its Parquet shards: the unsharded eager torchrec model (the same weights) vs
   ``model.pt`` on raw values (each index decoded back to a raw value that the artifact maps to it: a vocabulary key,
   a hash pre-image, or missing), ``model.pt`` on indices, and ``model.pt2`` on raw values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from data_pipeline.raw_inputs import string_keys, string_salt
from data_pipeline.spec import WEIGHT_SUFFIX, DatasetSpec
from data_pipeline.vocab import splitmix64
from distributed import storage
from distributed.checkpoint import load_unsharded
from launch.config import config_from_dict, to_dict
from launch.worker import EXPORT_REFERENCE_FILE, METRICS_FILE
from pimm_model.export import (
    UNKNOWN,
    HashEncoder,
    IdentityEncoder,
    ServingModel,
    VocabEncoder,
    export_program,
    export_torchscript,
    inference_model_from_state,
)
from pimm_model.model import MultiTaskTrain, build_model

MODEL_FILE = "model.pt"
PROGRAM_FILE = "model.pt2"
MODEL_CARD = "model.json"
ARTIFACT_FILES = (MODEL_FILE, PROGRAM_FILE, MODEL_CARD)  # what a run folder ships (the card last)
CARD_VERSION = 2
EXPORT_TOLERANCE = 1e-6
PARITY_BATCH = 8192


def artifact_files(program: bool = True) -> Tuple[str, ...]:
    """The files an export writes, the card last; without ``program`` no model.pt2."""
    return ARTIFACT_FILES if program else tuple(n for n in ARTIFACT_FILES if n != PROGRAM_FILE)


# ---------------------------------------------------------------------------------------------------- field contracts


@dataclass
class FieldContract:
    """How one field's raw values reach its embedding table: the encoder put in the artifact, its model.json entry,
    and ``decode(indices) -> (raw, missing)``, an inverse used to feed the whole test split through the raw entry."""

    name: str
    multi_valued: bool
    num_embeddings: int
    value_type: str  # "int64" | "string" (passed as its int64 string key)
    encoding: Dict[str, Any]
    encoder: torch.nn.Module
    decode: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]] = field(repr=False)
    weighted: bool = False  # a weighted bag: callers pass its per-value weights (`weights` of the jagged entries)

    def card(self) -> Dict[str, Any]:
        out = {"name": self.name, "value_type": self.value_type, "multi_valued": self.multi_valued,
               "num_embeddings": self.num_embeddings, "encoding": self.encoding}
        if self.weighted:
            out["weighted"] = True
            out["weight_column"] = self.name + WEIGHT_SUFFIX
        return out


def _unsplitmix64(h: np.ndarray) -> np.ndarray:
    """Inverse of ``vocab.splitmix64`` (a bijection of uint64): xor-shifts undone, multipliers by their inverses."""
    with np.errstate(over="ignore"):
        z = h.astype(np.uint64)
        z = z ^ (z >> np.uint64(31)) ^ (z >> np.uint64(62))
        z = z * np.uint64(0x319642B2D24D8EC3)  # inverse of 0x94D049BB133111EB mod 2**64
        z = z ^ (z >> np.uint64(27)) ^ (z >> np.uint64(54))
        z = z * np.uint64(0x96DE1B173F119089)  # inverse of 0xBF58476D1CE4E5B9
        z = z ^ (z >> np.uint64(30)) ^ (z >> np.uint64(60))
        return z - np.uint64(0x9E3779B97F4A7C15)


def _identity(f, num: int) -> FieldContract:
    def decode(idx: np.ndarray):
        return idx.astype(np.int64), np.zeros(len(idx), bool)

    return FieldContract(f.name, f.multi_valued, num, "int64",
                         {"kind": "identity", "note": "raw id == index; ids outside [0, num_embeddings) and missing "
                                                      "values score as index 0"},
                         IdentityEncoder(num), decode)


def _vocab(f, num: int, e: Dict[str, Any], path: str, salt: bytes) -> FieldContract:
    table = pq.read_table(path)
    for col in ("value", "index"):
        if col not in table.column_names:
            raise ValueError(f"{path}: no {col!r} column (expected value, index, count)")
    values, index = table.column("value").combine_chunks(), table.column("index").to_numpy()
    is_null = values.is_null().to_numpy(zero_copy_only=False)
    null_index = int(index[is_null][0]) if is_null.any() else UNKNOWN
    values, index = values.filter(pa.array(~is_null)), index[~is_null].astype(np.int64)
    string = pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or e.get("key_type") == "str"
    keys = string_keys(values.cast(pa.string()), salt) if string else \
        values.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(np.unique(keys)) != len(keys):
        raise ValueError(f"field {f.name!r}: two vocabulary strings share a 64-bit string key; re-prepare the data "
                         "with another seed")
    if len(index) and (index.min() < 1 or max(index.max(), null_index) >= num):
        raise ValueError(f"{path}: indices outside [1, {num}) (num_embeddings in spec.json)")
    lookup_raw = np.zeros(num, np.int64)
    lookup_missing = np.zeros(num, bool)
    lookup_raw[index] = keys
    lookup_raw[UNKNOWN] = np.setdiff1d(np.arange(len(keys) + 1, dtype=np.int64), keys)[0]  # any key not in the vocab
    if null_index != UNKNOWN:
        lookup_missing[null_index] = True

    def decode(idx: np.ndarray):
        return lookup_raw[idx], lookup_missing[idx]

    encoding = {"kind": "vocab", "vocab_size": int(len(keys)), "null_index": null_index, "unknown_index": UNKNOWN,
                "source": os.path.relpath(path, os.path.dirname(os.path.dirname(path)))}
    return FieldContract(f.name, f.multi_valued, num, "string" if string else "int64", encoding,
                         VocabEncoder(torch.from_numpy(keys), torch.from_numpy(index), null_index), decode)


def _hash(f, num: int, e: Dict[str, Any], seed: int) -> FieldContract:
    buckets = int(e["buckets"])
    if buckets + 1 != num:
        raise ValueError(f"field {f.name!r}: {buckets} hash buckets but num_embeddings {num} in spec.json")
    string = e.get("key_type") == "str"
    salt = int(splitmix64(np.array([seed], np.uint64))[0])

    def decode(idx: np.ndarray):
        h = (idx.astype(np.int64) - 1).clip(min=0).astype(np.uint64)  # a hash value landing in bucket idx - 1
        raw = h if string else _unsplitmix64(h) ^ np.uint64(salt)  # string keys are the hash itself
        return raw.view(np.int64), idx == UNKNOWN  # bucket 0 only holds missing values

    encoding = {"kind": "hash", "buckets": buckets, "seed": seed, "missing_index": UNKNOWN,
                "rule": "index = 1 + (string key as uint64) mod buckets" if string else
                        "index = 1 + splitmix64(value XOR splitmix64(seed)) mod buckets (uint64 arithmetic)"}
    return FieldContract(f.name, f.multi_valued, num, "string" if string else "int64", encoding,
                         HashEncoder(buckets, salt, mix=not string), decode)


def field_contracts(spec: DatasetSpec) -> Tuple[List[FieldContract], Dict[str, Any]]:
    """One FieldContract per spec field, in spec order, plus the string key description for model.json."""
    prepared = spec.meta.get("generator") == "data_pipeline.prepare"
    seed = int((spec.meta.get("config") or {}).get("seed", 0)) if prepared else 0
    salt = string_salt(seed)
    encodings = spec.meta.get("encoding") or {}
    vocab_files = spec.meta.get("vocab_files") or {}
    out: List[FieldContract] = []
    for f in spec.fields:
        num = int(f.num_embeddings)
        e = encodings.get(f.name)
        if e is None:
            if prepared:
                raise ValueError(f"{spec.root}/spec.json: field {f.name!r} has no encoding in meta.encoding")
            out.append(_identity(f, num))
        elif e.get("kind") == "vocab":
            if f.name not in vocab_files:
                raise ValueError(f"{spec.root}/spec.json: no vocabulary file for field {f.name!r} (meta.vocab_files)")
            out.append(_vocab(f, num, e, os.path.join(spec.root, vocab_files[f.name]), salt))
        elif e.get("kind") == "hash":
            out.append(_hash(f, num, e, seed))
        else:
            raise ValueError(f"{spec.root}/spec.json: field {f.name!r} has an unknown encoding {e!r}")
        out[-1].weighted = f.weighted
    key = {"algorithm": "blake2b", "digest_size": 8, "key_hex": salt.hex(), "seed": seed,
           "rule": "string key = BLAKE2b(UTF-8 bytes, digest_size=8, key=bytes.fromhex(key_hex)) read as a "
                   "little-endian two's-complement int64"}
    return out, key


# ---------------------------------------------------------------------------------------------------- export


def export_run(run_dir: str, checkpoint: Optional[str] = None, parity_rows: Optional[int] = None,
               progress: bool = True, program: bool = True) -> Dict[str, Any]:
    """Exports RUN_DIR's best (or the named) checkpoint; returns the card written to model.json.

    Args:
        run_dir: the run folder (config.yaml, metrics.json, export_reference.pt).
        checkpoint: a checkpoint folder name inside ``run_dir`` instead of the best epoch (no reference batch check).
        parity_rows: check only the first N test rows (default: the whole test split).
        progress: show a progress bar for the test-split check.
        program: also write model.pt2. torch.export.save holds two extra copies of every table while it writes
            (3x the tables in all, vs 2x without it: docs/performance.md, benchmark 5); without it an older
            model.pt2 in ``run_dir`` is removed, so that nothing stale sits beside the card.
    """
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        metrics = json.load(f)
    # the best checkpoint may belong to the run this one resumed from: use the recorded path
    ckpt = os.path.join(run_dir, checkpoint) if checkpoint else metrics["best_checkpoint"]
    spec = DatasetSpec.load(cfg.data.path)
    fields = [(f.name, f.num_embeddings) for f in spec.fields]
    contracts, string_key = field_contracts(spec)

    plain = MultiTaskTrain(build_model(cfg.model, fields, len(spec.labels), embedding_device=torch.device("cpu"),
                                       weighted=spec.weighted))
    local, downloaded = storage.local_copy(ckpt)  # the checkpoint may be on s3:// or gs://
    try:
        load_unsharded(local, plain)
    finally:
        if downloaded:
            shutil.rmtree(local, ignore_errors=True)
    eager = plain.model.eval()
    # the artifact's tables share the eager model's storage where they can (a 100 M-id table is 6.4 GB: every copy
    # held at once counts), and each artifact is loaded back and checked on its own, then freed
    core = inference_model_from_state(cfg.model, fields, len(spec.labels), eager.state_dict(), share=True)
    serving = ServingModel(core, [c.encoder for c in contracts], spec.labels)

    names = artifact_files(program)
    paths = {name: os.path.join(run_dir, name) for name in names}
    tmp = {name: os.path.join(run_dir, _tmp_name(name)) for name in names}
    try:
        export_torchscript(serving, tmp[MODEL_FILE])
        if program:
            export_program(serving, tmp[PROGRAM_FILE])
        del serving, core
        scripted = torch.jit.load(tmp[MODEL_FILE])
        reference = os.path.join(run_dir, EXPORT_REFERENCE_FILE)
        diff = _check_against_reference(scripted, reference) if checkpoint is None else None
        parity = whole_split_parity(eager, scripted, None, contracts, spec, max_rows=parity_rows, progress=progress)
        del scripted
        if program:
            loaded = torch.export.load(tmp[PROGRAM_FILE]).module()
            of_program = whole_split_parity(eager, None, loaded, contracts, spec, max_rows=parity_rows,
                                            progress=progress)
            del loaded
            parity["max_abs_diff"].update(of_program["max_abs_diff"])
            parity["rows_torch_export"] = of_program["rows_torch_export"]
        card = _card(cfg, metrics, spec, contracts, string_key, ckpt, diff, parity,
                     {name: tmp[name] for name in names if name != MODEL_CARD})
        with open(tmp[MODEL_CARD], "w") as f:
            json.dump(card, f, indent=1)
        for name in names:  # the card last: a model.json always describes the files beside it
            if name == MODEL_CARD and not program and os.path.exists(os.path.join(run_dir, PROGRAM_FILE)):
                os.remove(os.path.join(run_dir, PROGRAM_FILE))  # an older export's: not described by this card
            os.replace(tmp[name], paths[name])
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    return card


def _tmp_name(name: str) -> str:
    """A hidden temporary name keeping the extension (torch.export.load wants a .pt2 path)."""
    stem, ext = os.path.splitext(name)
    return f".{stem}.tmp-{os.getpid()}{ext}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _card(cfg, metrics, spec: DatasetSpec, contracts: List[FieldContract], string_key: Dict[str, Any], ckpt: str,
          diff: Optional[float], parity: Dict[str, Any], files: Dict[str, str]) -> Dict[str, Any]:
    tasks = list(spec.labels)
    best = metrics.get("best_epoch")
    best_valid = next((e.get("valid") for e in metrics.get("epochs", []) if e.get("epoch") == best), None)
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    dense = not any(c.multi_valued for c in contracts)
    return {
        "format_version": CARD_VERSION,
        "model": cfg.model.name,
        "tasks": tasks,
        "fields": [c.card() for c in contracts],
        "string_key": string_key,
        "inputs": {
            "forward": "model(raw, missing=None): raw int64 (B, F), one raw value per field in `fields` order "
                       "(string fields: their string key, see `string_key`); missing bool (B, F), True where a value "
                       "is absent (raw is then ignored) -> {task: float32 (B,) probability}",
            "forward_raw_jagged": "model.forward_raw_jagged(values, lengths, missing=None, weights=None): bag "
                                  "fields; raw int64 values (N,) field-major (all rows of field 0 first), lengths "
                                  "int64 (F*B,), missing bool (N,) or None, weights float32 (N,) or None (the "
                                  "per-value weights of `weighted` fields, 1.0 for the others) -> {task: (B,)}",
            "forward_indices": "model.forward_indices(ids): int64 (B, F) embedding indices -> float32 (B, T)",
            "forward_jagged": "model.forward_jagged(values, lengths, weights=None): indices in KJT layout -> "
                              "float32 (B, T)",
            "encode": "model.encode(raw, missing=None) -> (B, F) indices; encode_jagged(values, lengths, missing)",
            "unknown": "a value the vocabulary does not hold maps to index 0 (identity fields: an id outside "
                       "[0, num_embeddings) maps to 0)",
            "missing": "a missing value maps as data preparation mapped it: the vocabulary's null_index (its own "
                       "index when frequent in train, else 0); hashed and identity fields: 0; a missing bag is an "
                       "empty bag (pools to zero)",
            **({PROGRAM_FILE: "torch.export.load(path).module()(raw, missing): both (B, F) tensors required, "
                              "B >= 1; the jagged entries exist in model.pt only"} if PROGRAM_FILE in files else {}),
            "all_fields_single_valued": dense,
        },
        "outputs": {"type": "Dict[str, Tensor]", "keys": tasks,
                    "meaning": "marginal P(task positive | impression), float32 (B,) per task, in chain order"},
        "files": {name: {"sha256": _sha256(path), "bytes": os.path.getsize(path)} for name, path in files.items()},
        "torch": {"exported_with": torch.__version__,
                  MODEL_FILE: f"torch.jit.load / libtorch torch::jit::load, torch >= {major_minor}",
                  **({PROGRAM_FILE: f"torch.export.load, torch {major_minor}.x (the program format is versioned)"}
                     if PROGRAM_FILE in files else {})},
        "training": {
            "config": to_dict(cfg),
            "metrics": {"test": metrics.get("test"), "best_epoch": best, "valid_best_epoch": best_valid,
                        "early_stop_metric": metrics.get("early_stop_metric"),
                        "world_size": metrics.get("world_size"), "epochs_run": len(metrics.get("epochs", []))},
        },
        "parity": parity,
        "checkpoint": ckpt,
        "export_max_abs_diff": diff,
        "data_spec": spec.root,
        "spec_meta": spec.meta,
    }


def _check_against_reference(scripted, reference_path: str) -> float:
    ref = torch.load(reference_path, weights_only=True)
    with torch.no_grad():
        probs = scripted.forward_jagged(ref["values"], ref["lengths"], ref.get("weights"))
    keep = ref["keep"]
    diff = float((probs[keep] - ref["probs"][keep]).abs().max()) if bool(keep.any()) else 0.0
    if not diff <= EXPORT_TOLERANCE:
        raise RuntimeError(f"the exported model differs from the trained model by {diff:.3g} (> {EXPORT_TOLERANCE}) "
                           f"on the reference batch {reference_path}: refusing a wrong model")
    return diff


def _stack(probs: Dict[str, torch.Tensor], tasks: List[str]) -> torch.Tensor:
    return torch.stack([probs[t] for t in tasks], dim=1)  # (B, T)


@torch.no_grad()
def whole_split_parity(eager: torch.nn.Module, scripted, program, contracts: List[FieldContract], spec: DatasetSpec,
                       split: str = "test", batch_size: int = PARITY_BATCH, max_rows: Optional[int] = None,
                       progress: bool = True) -> Dict[str, Any]:
    """Streams ``split`` and compares the eager torchrec model (``MultiTaskModel`` in eval mode, unsharded) with
    the scripted artifact (raw and index entries) and the torch.export program (raw (B, F) entry; for data with bag
    fields on the rows whose every bag holds one value); either artifact may be None (not checked in this pass).
    Raises when a difference exceeds EXPORT_TOLERANCE."""
    from tqdm import tqdm

    from data_pipeline.reader import ShardReader

    if max_rows is not None:  # the first max_rows rows (rounded up to whole batches)
        batch_size = max(1, min(batch_size, max_rows))
    reader = ShardReader(spec, spec.files(split), batch_size)
    batches = reader.num_padded_batches()
    if max_rows is not None:
        batches = min(batches, math.ceil(max_rows / batch_size))
    tasks, nf = list(spec.labels), len(contracts)
    diffs = {**({"torchscript_raw": 0.0, "torchscript_indices": 0.0} if scripted is not None else {}),
             **({"torch_export_raw": 0.0} if program is not None else {})}
    rows = rows_export = 0
    eager.eval()
    bar = tqdm(total=min(reader.num_rows(), batches * batch_size), unit="rows", desc=f"export parity ({split})",
               disable=not progress, file=sys.stderr, mininterval=2.0, dynamic_ncols=True)
    for batch in reader.iter_eval(batches):
        keep = batch.weights > 0
        n_keep = int(keep.sum())
        if n_keep == 0:
            continue
        kjt = batch.features
        values, lengths, id_weights = kjt.values(), kjt.lengths().to(torch.int64), kjt.weights_or_none()
        b = batch.batch_size
        expected = torch.sigmoid(eager(kjt).float())  # (B, T) the trainer's evaluation output
        lens = lengths.view(nf, b)  # (F, B)
        totals = lens.sum(dim=1).tolist()
        raw_parts, miss_parts, starts = [], [], []
        start = 0
        for c, n in zip(contracts, totals):
            r, m = c.decode(values[start : start + n].numpy())
            raw_parts.append(r)
            miss_parts.append(m)
            starts.append(start)
            start += n
        raw = torch.from_numpy(np.ascontiguousarray(np.concatenate(raw_parts)))
        missing = torch.from_numpy(np.concatenate(miss_parts))
        if scripted is not None:
            got = {"torchscript_raw": _stack(scripted.forward_raw_jagged(raw, lengths, missing, id_weights), tasks),
                   "torchscript_indices": scripted.forward_jagged(values, lengths, id_weights)}
            for k, v in got.items():
                diffs[k] = max(diffs[k], float((v[keep] - expected[keep]).abs().max()))
        # the dense (B, F) entry of both artifacts, on the rows where every field holds exactly one value
        one = keep & (lens == 1).all(dim=0)  # (B,)
        if id_weights is not None:  # the dense entry takes no weights: only rows whose every id weighs 1.0
            not_unit = torch.zeros(nf * b, dtype=torch.int64).index_add_(
                0, torch.repeat_interleave(torch.arange(nf * b), lengths), (id_weights != 1.0).to(torch.int64))
            one &= (not_unit.view(nf, b) == 0).all(dim=0)
        if bool(one.any()):
            rows_idx = torch.nonzero(one).squeeze(1)
            first = torch.cumsum(lens, dim=1) - lens + torch.tensor(starts).unsqueeze(1)  # (F, B) position of row
            pos = first[:, rows_idx].t()  # (R, F)
            raw2d, miss2d = raw[pos], missing[pos]
            if scripted is not None:
                dense_ts = _stack(scripted(raw2d, miss2d), tasks)
                diffs["torchscript_raw"] = max(diffs["torchscript_raw"],
                                               float((dense_ts - expected[one]).abs().max()))
            if program is not None:
                dense_pt2 = _stack(program(raw2d, miss2d), tasks)
                diffs["torch_export_raw"] = max(diffs["torch_export_raw"],
                                                float((dense_pt2 - expected[one]).abs().max()))
                rows_export += int(one.sum())
        rows += n_keep
        bar.update(n_keep)
    bar.close()
    out = {"split": split, "rows": rows, **({"rows_torch_export": rows_export} if program is not None else {}),
           "max_abs_diff": diffs,
           "tolerance": EXPORT_TOLERANCE, "reference": "unsharded eager torchrec model of the same checkpoint, eval "
                                                       "mode (it equals the sharded one on the reference batch)"}
    worst = max(diffs, key=diffs.get) if diffs else None
    if worst is not None and not diffs[worst] <= EXPORT_TOLERANCE:
        raise RuntimeError(f"the exported model ({worst}) differs from the trained model by {diffs[worst]:.3g} "
                           f"(> {EXPORT_TOLERANCE}) on the {split} split: refusing a wrong model")
    if rows == 0:
        raise RuntimeError(f"the {split} split has no rows to check the export on")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", help="checkpoint folder name inside RUN_DIR (default: the best epoch)")
    ap.add_argument("--parity-rows", type=int, help="check the export on the first N test rows only (default: all)")
    ap.add_argument("--no-program", action="store_true",
                    help="write model.pt only, no model.pt2 (its writer needs 3x the tables' memory; model.pt 2x)")
    args = ap.parse_args(argv)
    card = export_run(args.run_dir, args.checkpoint, args.parity_rows, program=not args.no_program)
    print(json.dumps({k: card[k] for k in ("model", "tasks", "checkpoint", "export_max_abs_diff", "parity")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
