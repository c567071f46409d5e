"""Losses: TIRG's soft triplet and batch classification losses, CCNet's correction term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import batch_classification_loss, compute_loss, soft_triplet_loss


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


def reference_soft_triplet(query, target, scale):
    """Loop form of the TIRG code (all negatives): anchors are the 2B points."""
    points = scale * torch.cat([query, target])
    b = query.shape[0]
    terms = []
    for i in range(2 * b):
        pos = (i + b) % (2 * b)
        for k in range(2 * b):
            if k % b != i % b:
                d_pos = (points[i] - points[pos]).pow(2).sum()
                d_neg = (points[i] - points[k]).pow(2).sum()
                terms.append(torch.log1p(torch.exp(d_pos - d_neg)))
    return torch.stack(terms).mean()


def test_soft_triplet_matches_the_tirg_definition():
    query, target = unit(5, 8), unit(5, 8, seed=1)
    got = soft_triplet_loss(query, target, 4.0, negatives_per_anchor=None)
    torch.testing.assert_close(got, reference_soft_triplet(query, target, 4.0))


def test_soft_triplet_samples_negatives_with_the_seed():
    query, target = unit(6, 8), unit(6, 8, seed=1)
    torch.manual_seed(0)
    a = soft_triplet_loss(query, target, 4.0, negatives_per_anchor=3)
    torch.manual_seed(0)
    b = soft_triplet_loss(query, target, 4.0, negatives_per_anchor=3)
    assert torch.equal(a, b) and torch.isfinite(a)
    # perfectly separated pairs give a small loss, swapped pairs a large one
    assert soft_triplet_loss(query, query, 4.0, None) < soft_triplet_loss(
        query, query.roll(1, 0), 4.0, None
    )


def test_batch_classification_is_cross_entropy_on_the_diagonal():
    query, target = unit(4, 8), unit(4, 8, seed=2)
    logits = 9.0 * query @ target.T
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    torch.testing.assert_close(batch_classification_loss(query, target, 3.0), expected)


def test_compute_loss_uses_the_model_scale_and_adds_correction():
    query, target = unit(4, 8), unit(4, 8, seed=3)
    scale = torch.tensor(2.0, requires_grad=True)
    correction = torch.randn(4, 4, requires_grad=True)
    loss, logs = compute_loss(
        {"query": query, "target": target, "loss_scale": scale, "correction_logits": correction},
        "batch_classification",
        correction_weight=0.5,
    )
    main = batch_classification_loss(query, target, 2.0)
    corr = F.cross_entropy(correction, torch.arange(4))
    torch.testing.assert_close(loss, main + 0.5 * corr)
    loss.backward()
    assert scale.grad is not None and correction.grad is not None
    assert set(logs) == {"loss", "loss_composition", "loss_correction", "loss_scale", "batch_r1"}
    assert math.isclose(logs["loss_scale"], 2.0) and 0.0 <= logs["batch_r1"] <= 1.0


def test_compute_loss_rejects_bad_inputs():
    query = unit(4, 8)
    with pytest.raises(ValueError, match="loss_name"):
        compute_loss({"query": query, "target": query}, "hinge")
    with pytest.raises(ValueError, match="'target'"):
        compute_loss({"query": query}, "soft_triplet")
    with pytest.raises(ValueError, match="B >= 2"):
        compute_loss({"query": query[:1], "target": query[:1]}, "soft_triplet")
    with pytest.raises(ValueError, match="correction_logits"):
        compute_loss(
            {"query": query, "target": query, "correction_logits": torch.zeros(4, 3)},
            "batch_classification",
        )
    with pytest.raises(TypeError):
        compute_loss({"query": query, "target": query}, "soft_triplet", margin=1.0)
