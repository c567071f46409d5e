"""Name -> model constructor map (timm-style): ``create_model`` and ``list_models``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.models.base import ComposedRetrievalModel
from pipeline.models.small_map_conv import use_small_map_convs

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


def accepted_kwargs(name: str) -> list[str]:
    """Keyword arguments the constructor of model ``name`` accepts (its own and those its
    ``**common`` passes on to base classes)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    fn = _REGISTRY[name]
    inits = (
        [
            c.__init__
            for c in fn.__mro__
            if issubclass(c, ComposedRetrievalModel)
            and c is not ComposedRetrievalModel
            and "__init__" in vars(c)
        ]
        if isinstance(fn, type) and issubclass(fn, nn.Module)
        else [fn]
    )
    names: list[str] = []
    for init in inits:
        for p in inspect.signature(init).parameters.values():
            if (
                p.name != "self"
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                and p.name not in names
            ):
                names.append(p.name)
    return names


def size_kwarg(name: str) -> str:
    """The keyword that sets model ``name``'s width: ``embed_dim``, the query size, for
    models that take it; else ``expert_dim`` (CCNet: D per expert, the query is 7 D)."""
    return "embed_dim" if "embed_dim" in accepted_kwargs(name) else "expert_dim"


def create_model(name: str, **kwargs: Any) -> ComposedRetrievalModel:
    """Build model ``name``; ``kwargs`` (vocab_size, embed_dim, ...) are recorded on it
    as ``model.model_kwargs`` so a checkpoint can rebuild it. An unknown keyword raises
    TypeError naming it and the accepted ones."""
    accepted = accepted_kwargs(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown keyword argument(s) {unknown}; "
            f"accepted: {', '.join(accepted)}"
        )
    model = _REGISTRY[name](**kwargs)
    # 3x3 convs onto 2x2 maps (the trunk's last stage at 64 px, the one before at 32 px,
    # tirg_lastconv's and film's convs on the last map) train faster on the CPU as
    # per-tap products (pipeline.models.small_map_conv)
    use_small_map_convs(model)
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model
