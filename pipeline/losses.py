"""Training losses over a batch of (query, target) pairs whose i-th target is the i-th
query's match; every other target in the batch is a negative.

* ``soft_triplet``: TIRG's soft triplet loss (``compute_soft_triplet_loss_`` in the TIRG
  code): the 2B embeddings ``[query; target]`` are anchors, each anchor's partner is its
  positive, embeddings of other pairs are negatives, and
  ``loss = mean log(1 + exp(d(a, p) - d(a, n)))`` with ``d`` the squared Euclidean
  distance. Like the TIRG code it samples ``negatives_per_anchor`` (3) negatives per
  anchor (from torch's global RNG, so it follows the run's seed); ``None`` uses all.
* ``batch_classification``: TIRG's batch-based classification loss, CCNet Eq. 9: softmax
  over the batch's targets, cross-entropy on the diagonal.

Scale: TIRG multiplies both unit vectors by a learned ``s`` (``NormalizationLayer``,
initialised at 4), so logits are ``s^2 * cos`` and distances ``s^2 * ||q - t||^2``. The
models own ``s`` as ``model.loss_scale`` (``loss_scale_init``/``learn_loss_scale``
kwargs) and return it as ``outputs["loss_scale"]``; without it ``scale`` (4.0) is used.

CCNet (``outputs["correction_logits"]`` (B, B)) also trains its correction network with
the classification loss: cross-entropy of each row against the diagonal, weighted by
``correction_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("soft_triplet", "batch_classification")
DEFAULT_SCALE = 4.0


def _check_pair(query: torch.Tensor, target: torch.Tensor) -> None:
    if query.dim() != 2 or query.shape != target.shape:
        raise ValueError(
            f"query and target must both be (B, D), got {tuple(query.shape)} "
            f"and {tuple(target.shape)}"
        )
    if query.shape[0] < 2:
        raise ValueError(
            f"a batch loss needs B >= 2 pairs (in-batch negatives), got B={query.shape[0]}"
        )


def soft_triplet_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | float,
    negatives_per_anchor: int | None = 3,
) -> torch.Tensor:
    """query, target (B, D) unit vectors -> scalar soft triplet loss (TIRG code)."""
    _check_pair(query, target)
    b = query.shape[0]
    points = scale * torch.cat([query, target])  # (2B, D)
    sq = points.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * points @ points.T).clamp(min=0)  # (2B, 2B)
    rows = torch.arange(2 * b, device=query.device)
    d_pos = dist[rows, (rows + b) % (2 * b)]  # (2B,)
    pair = rows % b
    is_negative = pair[:, None] != pair[None, :]  # (2B, 2B), 2B - 2 per row
    margins = F.softplus(d_pos[:, None] - dist)  # log(1 + exp(d(a,p) - d(a,n)))
    if negatives_per_anchor is None or negatives_per_anchor >= 2 * b - 2:
        return margins[is_negative].mean()
    if negatives_per_anchor < 1:
        raise ValueError(f"negatives_per_anchor must be >= 1 or None, got {negatives_per_anchor}")
    draw = torch.rand(dist.shape, device=query.device).masked_fill(~is_negative, -1.0)
    chosen = draw.topk(negatives_per_anchor, dim=1).indices  # random negatives per anchor
    return margins.gather(1, chosen).mean()


def batch_classification_loss(
    query: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """query, target (B, D) unit vectors -> cross-entropy of softmax(s^2 q t^T) on the diagonal."""
    _check_pair(query, target)
    logits = (scale * scale) * query @ target.T
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def compute_loss(
    outputs: dict[str, torch.Tensor],
    loss_name: str,
    *,
    scale: float = DEFAULT_SCALE,
    negatives_per_anchor: int | None = 3,
    correction_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch of model outputs -> ``(loss, logs)``.

    ``outputs``: the model's forward dict (``query``, ``target`` (B, D), optional
    ``loss_scale`` () and ``correction_logits`` (B, B)). ``logs`` holds detached 0-dim
    tensors (``float()`` them when logging: reading them back every step would make the
    host wait for the GPU): ``loss``, ``loss_composition``, ``loss_correction`` (CCNet
    only), ``loss_scale`` and ``batch_r1`` (fraction of queries whose own target scores
    highest in the batch).
    """
    if loss_name not in LOSSES:
        raise ValueError(f"loss_name must be one of {LOSSES}, got {loss_name!r}")
    for key in ("query", "target"):
        if key not in outputs:
            raise ValueError(f"outputs must contain {key!r}, got keys {sorted(outputs)}")
    query, target = outputs["query"], outputs["target"]
    s = outputs.get("loss_scale", scale)
    if loss_name == "soft_triplet":
        main = soft_triplet_loss(query, target, s, negatives_per_anchor)
    else:
        main = batch_classification_loss(query, target, s)
    loss = main
    labels = torch.arange(query.shape[0], device=query.device)
    logs = {"loss_composition": main.detach()}
    if "correction_logits" in outputs:
        corr = outputs["correction_logits"]
        if corr.shape != (query.shape[0], query.shape[0]):
            raise ValueError(
                f"correction_logits must be (B, B) = {(query.shape[0],) * 2}, "
                f"got {tuple(corr.shape)}"
            )
        correction = F.cross_entropy(corr, labels)
        loss = loss + correction_weight * correction
        logs["loss_correction"] = correction.detach()
    with torch.no_grad():
        logs["batch_r1"] = ((query @ target.T).argmax(1) == labels).float().mean()
    logs["loss"] = loss.detach()
    logs["loss_scale"] = s.detach() if isinstance(s, torch.Tensor) else torch.tensor(float(s))
    return loss, logs
