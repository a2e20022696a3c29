"""The full model (embedding + head) and its training wrapper, the only place where the loss is attached."""

from typing import Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from pimm_model.config import ModelConfig
from pimm_model.embedding import EmbeddingArch, make_tables
from pimm_model.losses import multitask_bce
from pimm_model.registry import build_head


class MultiTaskModel(nn.Module):
    """Shared embedding layer followed by a multi-task head; the module that gets sharded.

    Args:
        embedding: the field embeddings (its ``ebc`` is what the sharder shards).
        head: a registered head, ``forward(x, labels=None, p=0.0) -> logits (B, T)``.
    """

    def __init__(self, embedding: EmbeddingArch, head: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = head

    def forward(self, features: KeyedJaggedTensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            features: KJT with one key per field and B rows.
            labels: (B, T) labels, only read by the head in training mode.
            p: curriculum probability of feeding true labels to the PIM modules.

        Returns:
            logits (B, T).
        """
        x = self.embedding(features)  # (B, F*D)
        return self.head(x, labels, p)  # (B, T)


def build_model(
    cfg: ModelConfig,
    fields: Sequence[Tuple[str, int]],
    num_tasks: int,
    embedding_device: Optional[torch.device] = None,
    weighted: bool = False,
) -> MultiTaskModel:
    """Builds embedding + head.

    Args:
        cfg: model configuration (``cfg.name`` picks the head in the registry).
        fields: (field name, number of ids) per categorical field.
        num_tasks: number of tasks T.
        embedding_device: where the embedding tables are allocated (``torch.device("meta")`` before sharding);
            the head is always built on CPU.
        weighted: the batches' KJTs carry per-id weights (a data set with a weighted bag field).
    """
    embedding = EmbeddingArch(make_tables(fields, cfg.embedding_dim), device=embedding_device, dim=cfg.embedding_dim,
                              weighted=weighted)
    head = build_head(cfg, embedding.out_dim, num_tasks)
    return MultiTaskModel(embedding, head)


class BatchLike(Protocol):
    """What ``MultiTaskTrain`` reads from a batch."""

    features: KeyedJaggedTensor
    labels: Tensor  # (B, T) float32
    weights: Tensor  # (B,) float32, 0 for padding rows


class MultiTaskTrain(nn.Module):
    """Wraps a ``MultiTaskModel`` with the loss (like torchrec's ``DLRMTrain``).

    The loss is the sum over tasks of the per-task BCE over the entire space (``multitask_bce``), plus the head's
    own extra term when the head defines ``extra_loss(logits (B, T), labels (B, T), weights (B,)) -> ()`` (e.g.
    AITM's label constraint). The extra term is part of the returned loss but not of the per-task losses.

    Args:
        model: the model to train.
    """

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model
        self.p = 0.0
        # decided once here, not per step: whether the head adds a term of its own to the loss
        self.head_has_extra_loss = callable(getattr(model.head, "extra_loss", None))

    def set_p(self, p: float) -> None:
        """Sets the curriculum probability used by the PIM modules (once per epoch, by the trainer)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"curriculum p ({p}) must be in [0, 1]")
        self.p = float(p)

    def forward(self, batch: BatchLike) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Returns the loss () and (per-task loss (T,), logits (B, T), labels (B, T), weights (B,)), all detached
        except the loss."""
        logits = self.model(batch.features, batch.labels, self.p)  # (B, T)
        loss, per_task = multitask_bce(logits, batch.labels, batch.weights)  # (), (T,)
        if self.head_has_extra_loss:
            loss = loss + self.model.head.extra_loss(logits, batch.labels, batch.weights)  # ()
        return loss, (per_task.detach(), logits.detach(), batch.labels, batch.weights)
