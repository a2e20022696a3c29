"""The unit the reader yields and the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One mini-batch of B rows.

    features: KJT with keys = field names in spec order, stride B (values int64, lengths int32).
    labels:   (B, T) float32, column t = task t in chain order.
    weights:  (B,) float32, 1.0 for a real row, 0.0 for a padding row (only eval batches are padded).
    """

    features: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        # Tell the caching allocator these tensors are used on `stream`, so a TrainPipeline that copied them on a
        # side stream does not free/reuse their memory while the compute stream still reads them.
        self.features.record_stream(stream)
        self.labels.record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            features=self.features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])
