"""Dataset description shared by the generator, the reader and the trainer.

A dataset is a folder holding ``spec.json`` plus Parquet shards per split. The spec lists the sparse fields (name and
cardinality), the label columns in chain order (task 0 first), the shards of every split relative to the folder, and
row counts. Paths are stored relative so a dataset folder can be moved or copied to another machine as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

SPEC_FILE = "spec.json"
WEIGHT_SUFFIX = "__weights"  # column <field>__weights: the per-id weights of a weighted bag field


@dataclass
class FieldSpec:
    """One sparse feature column.

    ``multi_valued=False``: an int64 column, one id per row. ``True``: a list<int64> column (a bag of ids per row).
    ``weighted=True`` (bags only): a ``<name>__weights`` list<float32> column holds one weight per id (e.g. the count
    Ali-CCP gives a 109_14 entry); the bag pools to the weighted sum of its embeddings. Ids lie in
    ``[0, num_embeddings)``.
    """

    name: str
    num_embeddings: int
    multi_valued: bool = False
    weighted: bool = False

    @property
    def weight_column(self) -> str:
        return self.name + WEIGHT_SUFFIX


@dataclass
class DatasetSpec:
    """Description of a dataset folder (see module docstring)."""

    fields: List[FieldSpec]
    labels: List[str]
    splits: Dict[str, List[str]]
    rows: Dict[str, int]
    meta: Dict[str, Any] = field(default_factory=dict)
    root: str = ""  # folder holding spec.json; set by save/load, never serialised (the folder may move)

    @property
    def field_names(self) -> List[str]:
        return [f.name for f in self.fields]

    @property
    def weighted(self) -> bool:
        """True when some field is a weighted bag: the KJTs then carry weights (1.0 for the other fields' ids)."""
        return any(f.weighted for f in self.fields)

    def files(self, split: str) -> List[str]:
        """Absolute paths of the shards of ``split``."""
        if split not in self.splits:
            raise ValueError(
                f"unknown split {split!r} in dataset {self.root or '<unsaved>'}; available: {sorted(self.splits)}"
            )
        return [os.path.abspath(os.path.join(self.root, p)) for p in self.splits[split]]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d

    def save(self, root: str) -> str:
        """Write ``root/spec.json`` (the dataset's completion marker: write it last) and return its path."""
        self.validate(where=root)
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, SPEC_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written spec.json
        self.root = os.path.abspath(root)
        return path

    @staticmethod
    def load(path: str) -> DatasetSpec:
        """Load from a folder containing spec.json, or from the spec.json file itself; validates shards exist."""
        if os.path.isdir(path):
            root, file = path, os.path.join(path, SPEC_FILE)
        else:
            root, file = os.path.dirname(path) or ".", path
        if not os.path.isfile(file):
            d = root if os.path.isdir(root) else path
            raise FileNotFoundError(
                f"no {SPEC_FILE} in {d}: point data.path at a folder written by data_pipeline.synthetic "
                "or launch/prepare_data.py"
            )
        try:
            with open(file) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        missing = [k for k in ("fields", "labels", "splits", "rows") if k not in raw]
        if missing:
            raise ValueError(f"{file}: missing keys {missing}")
        try:
            fields = [FieldSpec(**f) for f in raw["fields"]]
        except TypeError as e:
            raise ValueError(f"{file}: bad field entry ({e}); expected name, num_embeddings, multi_valued, "
                             "weighted") from e
        # specs written before `weighted` existed list their weight columns in meta only: honour them
        legacy = raw.get("meta", {}).get("weight_columns", {}) or {}
        for f, entry in zip(fields, raw["fields"]):
            if "weighted" not in entry and f.name in legacy:
                f.weighted = True
        spec = DatasetSpec(
            fields=fields,
            labels=list(raw["labels"]),
            splits={k: list(v) for k, v in raw["splits"].items()},
            rows={k: int(v) for k, v in raw["rows"].items()},
            meta=raw.get("meta", {}),
            root=os.path.abspath(root),
        )
        spec.validate(where=file, check_files=True)
        return spec

    def validate(self, where: str = "", check_files: bool = False) -> None:
        """Raise ValueError (prefixed with ``where``) on an inconsistent spec; optionally check the shards exist."""
        p = f"{where}: " if where else ""
        if not self.fields:
            raise ValueError(f"{p}no fields")
        if len(self.labels) < 2:
            raise ValueError(f"{p}need at least 2 labels (a chain of tasks), got {self.labels}")
        for f in self.fields:
            if int(f.num_embeddings) < 1:
                raise ValueError(f"{p}field {f.name!r} has num_embeddings={f.num_embeddings}; must be >= 1")
            if f.weighted and not f.multi_valued:
                raise ValueError(f"{p}field {f.name!r} is weighted but not multi_valued: only bags carry weights")
        names = self.field_names + list(self.labels) + [f.weight_column for f in self.fields if f.weighted]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"{p}duplicate field/label names {dups}")
        no_rows = sorted(set(self.splits) - set(self.rows))
        if no_rows:
            raise ValueError(f"{p}splits {no_rows} have no entry in 'rows'")
        if check_files:
            for split in self.splits:
                for file in self.files(split):
                    if not os.path.isfile(file):
                        raise ValueError(f"{p}shard of split {split!r} listed but missing: {file}")
