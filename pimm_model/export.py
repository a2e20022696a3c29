"""Servable TorchScript export that loads without torchrec or fbgemm_gpu.

The trained torchrec tables are copied into plain ``nn.EmbeddingBag`` modules (one per field, sum pooling), so
the scripted program contains only core torch ops.
"""

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.embedding import storage_dim
from pimm_model.registry import build_head


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
            ids: (B, F) int64, one id per field (single-valued fields), columns in ``field_names`` order.

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
    def forward_jagged(self, values: Tensor, lengths: Tensor) -> Tensor:
        """Scores multi-valued fields given in KeyedJaggedTensor layout.

        Args:
            values: (N,) int64 ids, field 0's rows first, then field 1's, and so on.
            lengths: (F*B,) number of ids of each (field, row), field-major.

        Returns:
            probabilities (B, T).
        """
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
            embs.append(bag(values[start : start + n], offsets))  # (B, D); empty bags pool to 0 as in torchrec
            start += n
        x = torch.cat(embs, dim=1)  # (B, F*D)
        return torch.sigmoid(self.head(x, None, 0.0))  # (B, T)


def inference_model_from_state(
    cfg: ModelConfig,
    fields: Sequence[Tuple[str, int]],
    num_tasks: int,
    state_dict: Dict[str, Tensor],
    prefix: str = "",
) -> InferenceModel:
    """Rebuilds a trained ``MultiTaskModel`` as an ``InferenceModel``.

    Args:
        cfg: model configuration the weights were trained with.
        fields: (field name, number of ids) per field, as given to ``build_model``.
        num_tasks: number of tasks T.
        state_dict: an unsharded ``MultiTaskModel.state_dict()`` (keys ``embedding.ebc.embedding_bags.t_<field>.
            weight`` and ``head.*``), on any device.
        prefix: prefix in front of those keys, e.g. ``"model."`` for a ``MultiTaskTrain`` state dict.
    """
    bags: List[nn.EmbeddingBag] = []
    for name, num in fields:
        key = f"{prefix}embedding.ebc.embedding_bags.t_{name}.weight"
        if key not in state_dict:
            raise KeyError(f"missing embedding table {key!r} in the state dict")
        stored = (num, storage_dim(cfg.embedding_dim))
        if tuple(state_dict[key].shape) != stored:
            raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, expected {stored}")
        # only the first D columns are the model's (see embedding.STORAGE_ALIGN); clone: no storage shared
        weight = state_dict[key].detach()[:, : cfg.embedding_dim].to(device="cpu", dtype=torch.float32).clone()
        bags.append(nn.EmbeddingBag.from_pretrained(weight, freeze=True, mode="sum"))
    head = build_head(cfg, len(fields) * cfg.embedding_dim, num_tasks)
    head_prefix = f"{prefix}head."
    head_state = {k[len(head_prefix) :]: v for k, v in state_dict.items() if k.startswith(head_prefix)}
    head.load_state_dict(head_state, strict=True)
    return InferenceModel([name for name, _ in fields], bags, head)


def export_torchscript(model: InferenceModel, path: str) -> None:
    """Scripts ``model`` (in eval mode) and saves it to ``path``; load with ``torch.jit.load``."""
    model.eval()
    torch.jit.save(torch.jit.script(model), path)
