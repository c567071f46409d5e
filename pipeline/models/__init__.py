"""Model library: encoders, composers and the registry (``create_model``, ``list_models``).

Importing this package registers every model (the composer modules register on import).
"""

from pipeline.models import ccnet, composers  # noqa: F401  (importing registers the models)
from pipeline.models.base import ComposedRetrievalModel
from pipeline.models.registry import (
    accepted_kwargs,
    create_model,
    list_models,
    register_model,
    size_kwarg,
)

__all__ = [
    "ComposedRetrievalModel",
    "accepted_kwargs",
    "create_model",
    "list_models",
    "register_model",
    "size_kwarg",
]
