"""Composers of the TIRG paper (Vo et al., CVPR 2019): importing this package registers them."""

from pipeline.models.composers import (
    baselines,
    film,
    mrn,
    param_hashing,
    relationship,
    show_and_tell,
    tirg,
)

__all__ = ["baselines", "film", "mrn", "param_hashing", "relationship", "show_and_tell", "tirg"]
