"""The run configuration: typed dataclasses composed into one `Config`, loaded from YAML with `key=value` overrides.

    cfg = load_config("launch/configs/default.yaml", ["train.epochs=2", "model.name=pimm"])

Every key is checked against the dataclass it lands in: an unknown key or a value of the wrong type is rejected at
start with the dotted key named, long before a worker starts.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from data_pipeline.synthetic import SyntheticConfig
from pimm_model.config import CurriculumConfig, ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "default.yaml")


@dataclass
class DataConfig:
    path: Optional[str] = None  # folder holding spec.json + shards; None -> the synthetic set below, cached
    cache_dir: str = ".cache/pimm-data"  # where generated synthetic data sets are kept (relative to the repo root)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 2048  # per worker
    lr: float = 1e-3  # dense Adam (the paper sweeps {5e-4, 1e-3, 1.5e-3, 2e-3})
    weight_decay: float = 0.0  # L2 on dense (tower) weights
    # Fused embedding optimizer. "auto": Adam where fbgemm has a fused Adam kernel (GPU), exact row-wise Adagrad on
    # CPU, whose fbgemm kernel offers only (row-wise) Adagrad and SGD.
    sparse_optimizer: str = "auto"
    sparse_lr: float = 0.02
    embedding_l2: float = 0.0  # L2 applied by the fused optimizer to the embedding rows a batch touches
    num_workers: int = 2
    cpus_per_worker: int = 1  # also the intra-op thread count of each worker
    use_gpu: bool = False
    sharding_types: List[str] = field(default_factory=list)  # empty -> every type the device supports (planner picks)
    # Tables of at most this many MiB (rows x stored width x 4 bytes) are replicated on every worker (TorchRec
    # data_parallel): their lookups need no input/output all-to-all, their (small, dense) gradients join DDP's
    # all-reduce and a torch optimizer of the sparse optimizer's kind updates them (distributed/optim.py). With every
    # table replicated there is no all-to-all at all: x1.28 on the default model (docs/performance.md). 0: shard all.
    replicate_max_mb: float = 1.0
    # Tables of at least this many MiB are cut into one column-wise shard per worker (row-wise on GPU, where the
    # planner may pick it), so that none is held whole by a single rank: TorchRec would otherwise keep a D <= 128
    # table in ONE shard, and a 100 M x 16 table would fill one worker while the others stay empty. 0: off.
    split_min_mb: float = 256.0
    ddp_bucket_mb: float = 25.0  # DDP gradient bucket (TorchRec's default); smaller buckets start all-reducing sooner
    early_stop_metric: str = "final_auc"  # final_auc | sum_auc (validation)
    patience: int = 2  # epochs without improvement before stopping
    log_every: int = 50  # steps between progress lines
    max_failures: int = 0  # Ray restarts of the worker group
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK | SPREAD | STRICT_SPREAD (one per node)


@dataclass
class RunConfig:
    dir: Optional[str] = None  # run folder; None -> runs/<model>-<timestamp>
    keep_checkpoints: int = 0  # 0 keeps every epoch's checkpoint; K keeps the last K plus the best epoch
    # where checkpoints, metrics and the exported model go: None -> the run folder itself; else a folder every node
    # can read (NFS...) or a URI pyarrow understands (s3://bucket/runs, gs://..., file:///...)
    storage_path: Optional[str] = None
    # test rows on which the exported artifact must equal the trained model (<= 1e-6) before it is written; 0 = the
    # whole test split (minutes per million rows on CPU: bounded by default so huge test sets do not stall a run)
    export_parity_rows: int = 200_000
    # also write model.pt2 (torch.export). torch.export.save holds two extra copies of every table while it writes:
    # the export then needs ~3x the tables' size in driver memory, ~2x without it (a 100 M x 16 table: 18.8 GB vs
    # ~12.9 GB, docs/performance.md). Turn off for tables near the driver's memory; model.pt is always written.
    export_program: bool = True


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "pimm"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class Config:
    seed: int = 0
    resume: Optional[str] = None  # a checkpoint folder (e.g. runs/x/epoch_002) to continue from, any worker count
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _check_choice("train.early_stop_metric", self.train.early_stop_metric, ("final_auc", "sum_auc"))
        _check_choice("wandb.mode", self.wandb.mode, ("offline", "online", "disabled"))
        _check_choice("train.placement_strategy", self.train.placement_strategy, ("PACK", "SPREAD", "STRICT_SPREAD"))
        for key in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "log_every"):
            if getattr(self.train, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self.train, key)}")
        if self.train.patience < 0 or self.train.max_failures < 0 or self.run.keep_checkpoints < 0:
            raise ValueError("train.patience, train.max_failures and run.keep_checkpoints must be >= 0")
        if self.train.lr <= 0 or self.train.sparse_lr <= 0:
            raise ValueError("train.lr and train.sparse_lr must be > 0")


def _check_choice(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


class ConfigError(ValueError):
    pass


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section; expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        ktp, vtp = typing.get_args(tp) or (Any, Any)
        return {_coerce(key, ktp, k): _coerce(f"{key}.{k}", vtp, v) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls: type, data: Dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types (key named)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config in section {prefix.rstrip('.') or '<root>'}: {e}") from e


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(d: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        d = nxt
    d[parts[-1]] = value


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.epochs=2)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    # YAML parsing gives the natural types: 2 -> int, 0.5 -> float, [1, 2] -> list, null -> None, off -> False.
    value = yaml.safe_load(raw) if raw.strip() != "" else ""
    return key, value


def merge(base: Dict[str, Any], other: Dict[str, Any], cls: type = None) -> Dict[str, Any]:
    """`other` over `base`. Config sections (dataclasses) merge key by key; any other value, including a mapping
    such as data.synthetic.fields, is replaced whole: a preset that lists fields means exactly those fields."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for k, v in other.items():
        tp = hints.get(k)
        if tp is not None and typing.get_origin(tp) is typing.Union:  # Optional[Section]
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        section = tp is not None and dataclasses.is_dataclass(tp)
        out[k] = merge(out[k], v, tp) if section and isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults <- YAML file (default.yaml when `path` is None) <- `key=value` overrides."""
    path = path or DEFAULT_CONFIG
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found (presets live in {CONFIG_DIR})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    base = data.pop("base", None)  # a preset may build on another one
    if base is not None:
        parent = load_config(os.path.join(os.path.dirname(path), base))
        data = merge(to_dict(parent), data)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return from_dict(Config, data)


def config_from_dict(data: Dict[str, Any]) -> Config:
    return from_dict(Config, data)
