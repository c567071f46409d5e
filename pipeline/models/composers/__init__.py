"""Composers of the TIRG paper (Vo et al., CVPR 2019): importing this package registers them."""

from pipeline.models.composers import baselines, tirg

__all__ = ["baselines", "tirg"]
