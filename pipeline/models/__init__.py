"""Model library: encoders, composers and the registry (``create_model``, ``list_models``)."""

from pipeline.models.base import ComposedRetrievalModel
from pipeline.models.registry import create_model, list_models, register_model

__all__ = ["ComposedRetrievalModel", "create_model", "list_models", "register_model"]
