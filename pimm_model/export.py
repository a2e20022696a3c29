"""Servable exports that load without torchrec, fbgemm_gpu or this repository: TorchScript and torch.export.

Two layers, both scriptable and exportable:

- ``InferenceModel``: the trained tables copied into plain ``nn.EmbeddingBag`` modules (one per field, sum pooling)
  plus the trained head; it takes vocabulary INDICES and returns probabilities (B, T).
- ``ServingModel``: an ``InferenceModel`` behind per-field encoders that map RAW feature values to those indices
  inside the artifact, exactly as ``data_pipeline/vocab.py`` encoded them for training (``VocabEncoder``: sorted
  keys + ``torch.searchsorted``, unknown -> 0; ``HashEncoder``: the same splitmix64 / bucket arithmetic on int64
  tensors; ``IdentityEncoder``: data without a vocabulary, raw id == index), returning ``{task: (B,) probability}``.

String values are not hashed in the artifact (TorchScript has no UTF-8 encoder nor BLAKE2b): callers pass their
int64 string key, ``serving.contract.string_key`` (8-byte BLAKE2b of the UTF-8 bytes, keyed with the seed the data
was prepared with: for hashed fields exactly the hash training used). See docs/serving.md for the contract.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.embedding import storage_dim
from pimm_model.registry import build_head

UNKNOWN = 0  # the reserved index of an unknown (out-of-vocabulary / out-of-range) or, for hashed fields, missing value


class InferenceModel(nn.Module):
    """Pure-torch embedding lookup + the trained head, returning probabilities.

    Args:
        field_names: field names, in the order of the ids' columns and of the trained tables.
        bags: one ``nn.EmbeddingBag(num, dim, mode="sum")`` per field.
        head: the trained head; it is put in eval mode.
    """

    def __init__(self, field_names: List[str], bags: List[nn.EmbeddingBag], head: nn.Module) -> None:
        super().__init__()
        if len(field_names) != len(bags):
            raise ValueError(f"{len(field_names)} field names but {len(bags)} embedding bags")
        self.field_names: List[str] = list(field_names)
        self.num_fields = len(bags)
        self.bags = nn.ModuleList(bags)
        self.head = head
        self.eval()

    def forward(self, ids: Tensor) -> Tensor:
        """Args:
            ids: (B, F) int64 indices, one per field (a bag of one id), columns in ``field_names`` order.

        Returns:
            probabilities (B, T).
        """
        if ids.dim() != 2 or ids.size(1) != self.num_fields:
            raise ValueError("ids must have shape (B, F) with F = len(field_names)")
        embs: List[Tensor] = []
        for i, bag in enumerate(self.bags):
            embs.append(bag(ids[:, i : i + 1]))  # (B, D): each row is a bag of one id
        x = torch.cat(embs, dim=1)  # (B, F*D)
        return torch.sigmoid(self.head(x, None, 0.0))  # (B, T)

    @torch.jit.export
    def forward_jagged(self, values: Tensor, lengths: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """Scores multi-valued fields given in KeyedJaggedTensor layout.

        Args:
            values: (N,) int64 indices, field 0's rows first, then field 1's, and so on.
            lengths: (F*B,) number of ids of each (field, row), field-major.
            weights: (N,) float32 per-id weights (weighted bag fields; 1.0 for the other fields' ids), as the
                trainer's KJT carries them; None: every id weighs 1 (a plain sum).

        Returns:
            probabilities (B, T).
        """
        if weights is not None and weights.shape != values.shape:
            raise ValueError("weights must have the shape of values")
        if lengths.dim() != 1 or lengths.numel() % self.num_fields != 0:
            raise ValueError("lengths must have shape (F*B,) with F = len(field_names)")
        batch_size = lengths.numel() // self.num_fields
        lengths_2d = lengths.view(self.num_fields, batch_size)  # (F, B)
        field_totals = lengths_2d.sum(dim=1)  # (F,)
        if int(field_totals.sum()) != values.numel():
            raise ValueError("values must hold sum(lengths) ids")
        embs: List[Tensor] = []
        start = 0
        for i, bag in enumerate(self.bags):
            lens = lengths_2d[i]  # (B,)
            n = int(field_totals[i])
            offsets = (torch.cumsum(lens, dim=0) - lens).to(values.dtype)  # (B,) start of each row's bag
            w = None if weights is None else weights[start : start + n].to(torch.float32)
            embs.append(bag(values[start : start + n], offsets, w))  # (B, D); empty bags pool to 0 as in torchrec
            start += n
        x = torch.cat(embs, dim=1)  # (B, F*D)
        return torch.sigmoid(self.head(x, None, 0.0))  # (B, T)


# ---------------------------------------------------------------------------------------------------- encoders
# int64 tensors wrap on overflow like uint64 arithmetic does, so the unsigned hash of vocab.py is computed on the
# same 64 bits; only the right shifts and the modulo need care (torch's >> on int64 is arithmetic, % is signed).


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= (1 << 63) else c


def _shift_right_logical(x: Tensor, k: int) -> Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)  # drop the sign bits an arithmetic shift brings in


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64 finaliser on the 64 bits of an int64 tensor; bit-identical to ``data_pipeline.vocab.splitmix64``."""
    # the constants are 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB as int64 (TorchScript takes
    # literals, not module globals)
    z = x + -7046029254386353131
    z = (z ^ _shift_right_logical(z, 30)) * -4658895280553007687
    z = (z ^ _shift_right_logical(z, 27)) * -7723592293110705685
    return z ^ _shift_right_logical(z, 31)


def unsigned_mod(x: Tensor, m: int, two64_mod_m: int) -> Tensor:
    """(uint64 view of x) mod m for an int64 tensor x and 0 < m < 2**62; ``two64_mod_m`` = 2**64 mod m."""
    r = torch.remainder(x, m)  # in [0, m): x mod m for the signed value
    return torch.where(x < 0, torch.remainder(r + two64_mod_m, m), r)  # a negative x stands for x + 2**64


class IdentityEncoder(nn.Module):
    """Raw id == index (data prepared without a vocabulary, e.g. the synthetic generator). An id outside
    ``[0, num_embeddings)`` or a missing value scores as index 0 (for such data an ordinary id, not a reserved one).

    Args:
        num_embeddings: number of ids N of the field.
    """

    def __init__(self, num_embeddings: int) -> None:
        super().__init__()
        self.num_embeddings = int(num_embeddings)

    def forward(self, raw: Tensor, missing: Tensor) -> Tensor:
        """raw (N,) int64, missing (N,) bool -> indices (N,) int64."""
        ok = (raw >= 0) & (raw < self.num_embeddings) & ~missing
        return torch.where(ok, raw, torch.zeros_like(raw))


class VocabEncoder(nn.Module):
    """A vocabulary counted on the train split: raw key -> its index, any other key -> 0 (unknown), a missing value
    -> ``null_index`` (its own index when missing values were frequent enough in train, else 0).

    Args:
        keys: (V,) int64 raw keys (integer values, or string keys of string values), distinct.
        index: (V,) int64 index of each key, in ``[1, num_embeddings)``.
        null_index: index of a missing value.
    """

    def __init__(self, keys: Tensor, index: Tensor, null_index: int) -> None:
        super().__init__()
        keys = keys.to(torch.int64).reshape(-1)
        index = index.to(torch.int64).reshape(-1)
        if keys.numel() != index.numel():
            raise ValueError(f"{keys.numel()} keys but {index.numel()} indices")
        sorted_keys, order = torch.sort(keys)
        if sorted_keys.numel() > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            raise ValueError("vocabulary keys must be distinct")
        if keys.numel() == 0:  # an empty vocabulary: one entry that maps to unknown keeps searchsorted in range
            sorted_keys, index, order = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), \
                torch.zeros(1, dtype=torch.int64)
        self.register_buffer("keys", sorted_keys.contiguous())  # (V,) ascending
        self.register_buffer("index", index[order].contiguous())  # (V,) index of keys[i]
        self.last = int(self.keys.numel()) - 1
        self.null_index = int(null_index)

    def forward(self, raw: Tensor, missing: Tensor) -> Tensor:
        """raw (N,) int64, missing (N,) bool -> indices (N,) int64."""
        pos = torch.searchsorted(self.keys, raw).clamp(max=self.last)  # (N,) first key >= raw
        found = self.keys[pos] == raw
        out = torch.where(found, self.index[pos], torch.zeros_like(raw))
        return torch.where(missing, torch.full_like(raw, self.null_index), out)


class HashEncoder(nn.Module):
    """Feature hashing as in training: index = 1 + hash mod buckets, a missing value -> 0. Integer values are hashed
    with splitmix64(value XOR salt); string values arrive as their string key, which already is the salted hash.

    Args:
        buckets: number of hash buckets B (num_embeddings = B + 1), < 2**62.
        salt: splitmix64(seed) of the preparation seed, as int64 (integer fields).
        mix: True for integer values (apply splitmix64), False for string keys.
    """

    def __init__(self, buckets: int, salt: int, mix: bool) -> None:
        super().__init__()
        if not 0 < buckets < (1 << 62):
            raise ValueError(f"hash buckets must lie in [1, 2**62), got {buckets}")
        self.buckets = int(buckets)
        self.two64_mod = (1 << 64) % self.buckets
        self.salt = _s64(int(salt) & ((1 << 64) - 1))
        self.mix = bool(mix)

    def forward(self, raw: Tensor, missing: Tensor) -> Tensor:
        """raw (N,) int64, missing (N,) bool -> indices (N,) int64."""
        h = splitmix64(raw ^ self.salt) if self.mix else raw
        out = unsigned_mod(h, self.buckets, self.two64_mod) + 1
        return torch.where(missing, torch.zeros_like(out), out)


# ---------------------------------------------------------------------------------------------------- serving


class ServingModel(nn.Module):
    """Raw feature values in, per-task probabilities out: what ``model.pt`` and ``model.pt2`` hold.

    Args:
        core: the trained ``InferenceModel`` (on indices).
        encoders: one encoder per field, in ``core.field_names`` order (``IdentityEncoder``, ``VocabEncoder``,
            ``HashEncoder``): ``forward(raw (N,) int64, missing (N,) bool) -> (N,) int64 indices``.
        tasks: task names in chain order (column t of the probabilities).

    Example::

        m = torch.jit.load("model.pt")
        probs = m(raw)                      # raw (B, F) int64 -> {"click": (B,), "conversion": (B,), ...}
        probs = m(raw, missing)             # missing (B, F) bool: True where a value is absent
        probs = m.forward_raw_jagged(values, lengths, None)   # bag fields: KJT layout of raw values
        probs = m.forward_raw_jagged(values, lengths, None, weights)  # + per-value weights (weighted bags)
    """

    def __init__(self, core: InferenceModel, encoders: List[nn.Module], tasks: List[str]) -> None:
        super().__init__()
        if len(encoders) != core.num_fields:
            raise ValueError(f"{len(encoders)} encoders for {core.num_fields} fields")
        self.core = core
        self.encoders = nn.ModuleList(encoders)
        self.tasks: List[str] = list(tasks)
        self.field_names: List[str] = list(core.field_names)
        self.num_fields = core.num_fields
        self.requires_grad_(False)  # inference only: outputs need no .detach() before .numpy()
        self.eval()

    def forward(self, raw: Tensor, missing: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Args:
            raw: (B, F) int64 raw values (string fields: their string key), one per field in ``field_names`` order;
                a bag field gets a bag of that one value.
            missing: (B, F) bool, True where the value is absent (``raw`` is then ignored); None: none absent.

        Returns:
            {task: (B,) float32 probability}, in chain order.
        """
        return self._by_task(self.core(self.encode(raw, missing)))

    @torch.jit.export
    def encode(self, raw: Tensor, missing: Optional[Tensor] = None) -> Tensor:
        """(B, F) raw int64 values [+ (B, F) bool missing] -> (B, F) int64 indices."""
        if raw.dim() != 2 or raw.size(1) != self.num_fields:
            raise ValueError("raw must have shape (B, F) with F = len(field_names)")
        missing = self._missing_mask(raw, missing)
        cols: List[Tensor] = []
        for i, enc in enumerate(self.encoders):
            cols.append(enc(raw[:, i].contiguous(), missing[:, i]))  # (B,)
        return torch.stack(cols, dim=1)  # (B, F)

    @torch.jit.export
    def encode_jagged(self, values: Tensor, lengths: Tensor, missing: Optional[Tensor] = None) -> Tensor:
        """(N,) raw values in KJT layout (field-major, ``lengths`` (F*B,)) [+ (N,) bool missing] -> (N,) indices."""
        if lengths.dim() != 1 or lengths.numel() % self.num_fields != 0:
            raise ValueError("lengths must have shape (F*B,) with F = len(field_names)")
        missing = self._missing_mask(values, missing)
        totals = lengths.view(self.num_fields, -1).sum(dim=1)  # (F,) values per field
        if int(totals.sum()) != values.numel():
            raise ValueError("values must hold sum(lengths) values")
        parts: List[Tensor] = []
        start = 0
        for i, enc in enumerate(self.encoders):
            n = int(totals[i])
            parts.append(enc(values[start : start + n], missing[start : start + n]))
            start += n
        return torch.cat(parts)  # (N,)

    def _missing_mask(self, raw: Tensor, missing: Optional[Tensor]) -> Tensor:
        """Checks raw values are int64 and returns the missing mask of their shape (all False when None)."""
        if raw.dtype != torch.int64:
            raise ValueError("raw values must be int64 (string fields: their int64 string key)")
        if missing is None:
            return torch.zeros(raw.shape, dtype=torch.bool, device=raw.device)
        if missing.shape != raw.shape:
            raise ValueError("missing must have the shape of the raw values")
        return missing

    @torch.jit.export
    def forward_raw_jagged(self, values: Tensor, lengths: Tensor, missing: Optional[Tensor] = None,
                           weights: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Bag (multi-valued) fields: raw values in KeyedJaggedTensor layout.

        Args:
            values: (N,) int64 raw values, all of field 0's rows first, then field 1's, and so on.
            lengths: (F*B,) number of values of each (field, row), field-major; an empty bag pools to zero.
            missing: (N,) bool, True for an absent value inside a bag; None: none absent.
            weights: (N,) float32 weight of each value (the ``<field>__weights`` of weighted bag fields, 1.0 for
                the other fields); None: all 1.0.

        Returns:
            {task: (B,) probability}.
        """
        return self._by_task(self.core.forward_jagged(self.encode_jagged(values, lengths, missing), lengths, weights))

    @torch.jit.export
    def forward_indices(self, ids: Tensor) -> Tensor:
        """(B, F) int64 indices (the trainer's input) -> probabilities (B, T); for parity checks."""
        return self.core(ids)

    @torch.jit.export
    def forward_jagged(self, values: Tensor, lengths: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """Indices in KJT layout (the trainer's batches, with their per-id weights if any) -> probabilities (B, T);
        for parity checks."""
        return self.core.forward_jagged(values, lengths, weights)

    def _by_task(self, probs: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for t, name in enumerate(self.tasks):
            out[name] = probs[:, t]  # (B,)
        return out


def inference_model_from_state(
    cfg: ModelConfig,
    fields: Sequence[Tuple[str, int]],
    num_tasks: int,
    state_dict: Dict[str, Tensor],
    prefix: str = "",
    share: bool = False,
) -> InferenceModel:
    """Rebuilds a trained ``MultiTaskModel`` as an ``InferenceModel``.

    Args:
        cfg: model configuration the weights were trained with.
        fields: (field name, number of ids) per field, as given to ``build_model``.
        num_tasks: number of tasks T.
        state_dict: an unsharded ``MultiTaskModel.state_dict()`` (keys ``embedding.ebc.embedding_bags.t_<field>.
            weight`` and ``head.*``), on any device.
        prefix: prefix in front of those keys, e.g. ``"model."`` for a ``MultiTaskTrain`` state dict.
        share: use a table tensor itself, not a copy, when it is exactly the table (float32, CPU, the model's D
            columns, its whole storage): the inference model then shares the trained model's memory, which
            matters for 100 M-id tables (the copy is 6.4 GB). Default: copies, nothing shared.
    """
    bags: List[nn.EmbeddingBag] = []
    for name, num in fields:
        key = f"{prefix}embedding.ebc.embedding_bags.t_{name}.weight"
        if key not in state_dict:
            raise KeyError(f"missing embedding table {key!r} in the state dict")
        stored = (num, storage_dim(cfg.embedding_dim))
        if tuple(state_dict[key].shape) != stored:
            raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, expected {stored}")
        # only the first D columns are the model's (see embedding.STORAGE_ALIGN)
        weight = state_dict[key].detach()[:, : cfg.embedding_dim].to(device="cpu", dtype=torch.float32)
        whole = weight.is_contiguous() and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
        if not (share and whole):  # a copy unless asked to share, and always for a view of a wider storage
            weight = weight.clone()
        bags.append(nn.EmbeddingBag.from_pretrained(weight, freeze=True, mode="sum"))
    head = build_head(cfg, len(fields) * cfg.embedding_dim, num_tasks)
    head_prefix = f"{prefix}head."
    head_state = {k[len(head_prefix) :]: v for k, v in state_dict.items() if k.startswith(head_prefix)}
    head.load_state_dict(head_state, strict=True)
    return InferenceModel([name for name, _ in fields], bags, head)


def export_torchscript(model: nn.Module, path: str) -> None:
    """Scripts ``model`` (in eval mode) and saves it to ``path``; load with ``torch.jit.load``."""
    model.eval()
    torch.jit.save(torch.jit.script(model), path)


def export_program(model: ServingModel, path: str, example_rows: int = 8) -> None:
    """``torch.export`` of ``model.forward(raw (B, F), missing (B, F))`` with a dynamic batch size, saved to ``path``
    (``.pt2``); load with ``torch.export.load(path).module()``. Both inputs are required in the program.

    The jagged entry points are not exported: their per-field slices have data-dependent sizes.
    """
    model.eval()
    raw = torch.zeros(example_rows, model.num_fields, dtype=torch.int64)
    missing = torch.zeros(example_rows, model.num_fields, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (raw, missing), dynamic_shapes={"raw": {0: batch}, "missing": {0: batch}})
    torch.export.save(program, path)
