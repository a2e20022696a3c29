"""Registry of multi-task heads: everything after the shared embedding layer.

A builder has the signature ``(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module`` and returns a head
whose ``forward(x (B, in_dim), labels: Optional[Tensor] (B, T) = None, p: float = 0.0)`` gives logits (B, T).
"""

from typing import Callable, Dict

from torch import nn

from pimm_model.config import ModelConfig

HeadBuilder = Callable[[ModelConfig, int, int], nn.Module]

MODELS: Dict[str, HeadBuilder] = {}


def register_model(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator adding a head builder to ``MODELS`` under ``name``.

    Args:
        name: registry key, matched against ``ModelConfig.name``.
    """

    def deco(fn: HeadBuilder) -> HeadBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def build_head(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    """Builds the head registered under ``cfg.name``.

    Args:
        cfg: model configuration.
        in_dim: width of the concatenated field embeddings.
        num_tasks: number of tasks T.
    """
    if cfg.name not in MODELS:
        raise KeyError(f"unknown model {cfg.name!r}; registered: {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, in_dim, num_tasks)


# the built-in heads register themselves on import; this sits last because they import register_model from here
import pimm_model.models  # noqa: E402, F401
