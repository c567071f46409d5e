"""Numerical parity between two implementations of the same graph (torch vs ONNX Runtime,
ONNX Runtime vs TensorRT): max absolute difference and the worst row cosine similarity.

Thresholds: fp32 graphs must agree to 1e-4 (torch vs ORT) or 1e-3 (TensorRT, whose kernels
reorder sums); fp16 engines to 2e-2 with a row cosine of at least 0.999.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from export.artifacts import concrete_shape

ORT_TOLERANCE = 1e-4
TRT_FP32_TOLERANCE = 1e-3
TRT_FP16_TOLERANCE = 2e-2
FP16_MIN_COSINE = 0.999


class ParityError(AssertionError):
    """Two backends disagree beyond the tolerance."""


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """``{"max_abs_diff", "min_cosine"}`` of two same-shaped arrays; cosine per row (dim 0)."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ParityError(f"shape {candidate.shape} differs from reference {reference.shape}")
    if reference.size == 0:
        return {"max_abs_diff": 0.0, "min_cosine": 1.0}
    diff = float(np.max(np.abs(reference - candidate)))
    a = reference.reshape(reference.shape[0], -1)
    b = candidate.reshape(candidate.shape[0], -1)
    if a.shape[1] == 1:  # scalar per row (correction scores): compare the whole vector
        a, b = a.T, b.T
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one is not.
    cos = np.where(
        norms > 0,
        dots / np.maximum(norms, 1e-30),
        np.where(np.linalg.norm(a - b, axis=1) == 0, 1.0, 0.0),
    )
    return {"max_abs_diff": diff, "min_cosine": float(np.min(cos))}


def merge(stats: list[dict[str, float]]) -> dict[str, float]:
    """Worst case over several comparisons."""
    return {
        "max_abs_diff": max(s["max_abs_diff"] for s in stats),
        "min_cosine": min(s["min_cosine"] for s in stats),
    }


def compare_outputs(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Worst-case comparison over every named output present in ``reference``."""
    missing = sorted(set(reference) - set(candidate))
    if missing:
        raise ParityError(f"outputs {missing} missing from the candidate")
    return merge([compare(reference[k], candidate[k]) for k in reference])


def check(
    stats: dict[str, float], tolerance: float, what: str, min_cosine: float | None = None
) -> None:
    """Raise ``ParityError`` naming ``what`` when ``stats`` exceed the tolerance."""
    if not np.isfinite(stats["max_abs_diff"]) or stats["max_abs_diff"] > tolerance:
        raise ParityError(f"{what}: max abs diff {stats['max_abs_diff']:.3g} > {tolerance:g}")
    if min_cosine is not None and stats["min_cosine"] < min_cosine:
        raise ParityError(f"{what}: min cosine {stats['min_cosine']:.6f} < {min_cosine}")


def random_inputs(
    graph_info: dict, batch: int, length: int, vocab_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random feeds for one graph of artifacts.json (``inputs`` shapes, ``dtypes``).

    ``tokens`` are ids in [2, vocab_size) with padding after a random length per row;
    ``lengths`` hold those lengths (>= 1, the longest equal to ``length``); float inputs are
    standard normal (images are already normalised, representations are unconstrained).
    """
    feeds: dict[str, np.ndarray] = {}
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[rng.integers(batch)] = length
    for name, shape in graph_info["inputs"].items():
        dims = concrete_shape(shape, batch, length)
        dtype = graph_info["dtypes"][name]
        if name == "lengths":
            feeds[name] = lengths.astype(np.int64)
        elif name == "tokens":
            tokens = rng.integers(2, max(vocab_size, 3), size=dims).astype(np.int64)
            tokens[np.arange(dims[1])[None, :] >= lengths[:, None]] = 0
            feeds[name] = tokens
        else:
            feeds[name] = rng.standard_normal(dims).astype(dtype)
    return feeds
