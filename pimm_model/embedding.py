"""Shared embedding layer: one sum-pooled torchrec table per categorical field."""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType


def make_tables(fields: Sequence[Tuple[str, int]], dim: int) -> List[EmbeddingBagConfig]:
    """One embedding table per field.

    Args:
        fields: (field name, number of ids) per field, in the order of the concatenated output.
        dim: embedding size D of every field.

    Returns:
        Table configs named ``t_<field>``, each with the single feature ``<field>`` and SUM pooling.
    """
    names = [name for name, _ in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate field names in {names}")
    tables: List[EmbeddingBagConfig] = []
    for name, num in fields:
        if num <= 0:
            raise ValueError(f"field {name!r} has {num} ids; it needs at least one")
        tables.append(
            EmbeddingBagConfig(
                name=f"t_{name}",
                embedding_dim=dim,
                num_embeddings=num,
                feature_names=[name],
                pooling=PoolingType.SUM,
            )
        )
    return tables


class EmbeddingArch(nn.Module):
    """Looks up every field and concatenates the pooled embeddings.

    Args:
        tables: table configs (see ``make_tables``).
        device: where the tables are allocated; ``torch.device("meta")`` defers allocation to the sharder.
    """

    def __init__(self, tables: List[EmbeddingBagConfig], device: Optional[torch.device] = None) -> None:
        super().__init__()
        # the attribute name `ebc` is what the sharding code looks for (`embedding.ebc`)
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self._out_dim = sum(t.embedding_dim * len(t.feature_names) for t in tables)
        self.feature_names: List[str] = [f for t in tables for f in t.feature_names]

    @property
    def out_dim(self) -> int:
        """Width F*D of the concatenated output."""
        return self._out_dim

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        # features: F keys, B rows each -> pooled (B, F*D), fields in table order whatever the KJT key order.
        # A SHARDED collection returns its KeyedTensor with keys grouped by shard (e.g. f0, f2, f1 for two ranks),
        # so `.values()` would silently permute the fields; regroup by name to keep the towers' input layout.
        pooled = self.ebc(features).to_dict()  # field -> (B, D)
        return torch.cat([pooled[name] for name in self.feature_names], dim=1)  # (B, F*D)
