"""Name -> model constructor map (timm-style): ``create_model`` and ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.models.base import ComposedRetrievalModel

_REGISTRY: dict[str, Callable[..., ComposedRetrievalModel]] = {}


def register_model(name: str) -> Callable:
    """Class/function decorator adding a constructor under ``name``."""

    def wrap(fn: Callable[..., ComposedRetrievalModel]) -> Callable[..., ComposedRetrievalModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> ComposedRetrievalModel:
    """Build model ``name``; ``kwargs`` (vocab_size, embed_dim, ...) are recorded on it
    as ``model.model_kwargs`` so a checkpoint can rebuild it."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _REGISTRY[name](**kwargs)
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model
