"""Shared embedding layer: one sum-pooled torchrec table per categorical field."""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

# fbgemm's fused table-batched kernels (the ones that update embedding rows inside backward) need every table's
# width, and every column shard's width, to be a multiple of 4. The paper uses D = 5 on Ali-CCP, so tables are
# STORED at the next multiple of 4 and the model reads only their first D columns: sum pooling is per column, so
# slicing after pooling is exact, and the spare columns are never read, get no gradient and are not exported.
STORAGE_ALIGN = 4


def storage_dim(dim: int) -> int:
    """Stored table width for a model embedding size ``dim`` (the next multiple of STORAGE_ALIGN)."""
    return -(-dim // STORAGE_ALIGN) * STORAGE_ALIGN


def make_tables(fields: Sequence[Tuple[str, int]], dim: int) -> List[EmbeddingBagConfig]:
    """One embedding table per field.

    Args:
        fields: (field name, number of ids) per field, in the order of the concatenated output.
        dim: embedding size D of every field (the table is stored ``storage_dim(D)`` wide).

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
                embedding_dim=storage_dim(dim),
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
        dim: embedding size D the model uses per field (the first D columns of each table); default: the
            tables' own width.
        weighted: the input KJT carries per-id weights and each bag pools to the WEIGHTED sum of its embeddings
            (fields without weights of their own get weight 1.0 per id, which is the plain sum).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        device: Optional[torch.device] = None,
        dim: Optional[int] = None,
        weighted: bool = False,
    ) -> None:
        super().__init__()
        # the attribute name `ebc` is what the sharding code looks for (`embedding.ebc`)
        self.ebc = EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=device)
        self.weighted = weighted
        widths = {t.embedding_dim for t in tables}
        self.dim: int = dim if dim is not None else min(widths)
        if any(w < self.dim for w in widths):
            raise ValueError(f"embedding dim {self.dim} is wider than a table ({sorted(widths)})")
        self._out_dim = sum(self.dim * len(t.feature_names) for t in tables)
        self.feature_names: List[str] = [f for t in tables for f in t.feature_names]

    @property
    def out_dim(self) -> int:
        """Width F*D of the concatenated output."""
        return self._out_dim

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        # features: F keys, B rows each (+ per-id weights when weighted) -> pooled (B, F*D), fields in table order
        # whatever the KJT key order.
        # A SHARDED collection returns its KeyedTensor with keys grouped by shard (e.g. f0, f2, f1 for two ranks),
        # so `.values()` would silently permute the fields; regroup by name to keep the towers' input layout.
        pooled = self.ebc(features).to_dict()  # field -> (B, storage_dim(D))
        return torch.cat([pooled[name][:, : self.dim] for name in self.feature_names], dim=1)  # (B, F*D)
