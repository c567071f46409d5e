"""CCNet's re-ranking (Eq. 15): the correction network re-scores the composition
network's top candidates, and the final score combines both softmaxes. Evaluation and
the query engine call the same function, so served and evaluated rankings agree."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import Repr

DEFAULT_LOGIT_SCALE = 16.0  # (TIRG's initial normalisation scale 4)^2


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def composition_logit_scale(model: nn.Module) -> float:
    """The composition network's softmax scale: ``s^2`` with ``s`` the model's learned
    ``loss_scale`` (the batch-classification logits of training, CCNet Eq. 9)."""
    scale = getattr(model, "loss_scale", None)
    if scale is None:
        return DEFAULT_LOGIT_SCALE
    return float(scale.detach() if isinstance(scale, torch.Tensor) else scale) ** 2


def gather_rows(repr_: Repr, rows: torch.Tensor, device: torch.device) -> Repr:
    return tuple(r[rows.to(r.device)].to(device) for r in repr_)


@torch.inference_mode()
def rerank_with_correction(
    model: nn.Module,
    *,
    ref_repr: Repr,
    text_repr: Repr,
    gallery_repr: Repr,
    candidates: torch.Tensor,
    candidate_scores: torch.Tensor,
    gallery_logsumexp: torch.Tensor | None = None,
    logit_scale: float | None = None,
    pair_batch: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CCNet Eq. 15: re-rank each query's candidates by
    ``log softmax_gallery(lambda * s_j) + log softmax_candidates(c_j)``.

    ``ref_repr``/``text_repr``: the c queries' representations (c, ...);
    ``gallery_repr``: stored image representations (N, ...); ``candidates`` (c, K) gallery
    rows (-1 = empty slot); ``candidate_scores`` (c, K) composition scores (cosines);
    ``gallery_logsumexp`` (c,) the log-sum-exp of ``lambda * scores`` over the query's
    whole allowed gallery (None: over the candidates; the order is the same, only the
    returned values change); ``logit_scale`` lambda (default ``composition_logit_scale``).
    Returns ``(candidates (c, K), scores (c, K))`` sorted best first; empty slots last.
    """
    device = model_device(model)
    lam = composition_logit_scale(model) if logit_scale is None else float(logit_scale)
    candidates = candidates.to(device)
    count, width = candidates.shape
    valid = candidates >= 0
    flat = candidates.clamp(min=0).reshape(-1)
    correction = torch.empty(count * width, device=device)
    for start in range(0, count * width, pair_batch):
        pos = torch.arange(start, min(start + pair_batch, count * width), device=device)
        query = pos // width
        correction[pos] = model.correct(
            gather_rows(ref_repr, query, device),
            gather_rows(gallery_repr, flat[pos], device),
            gather_rows(text_repr, query, device),
        ).float()
    correction = correction.view(count, width).masked_fill(~valid, float("-inf"))
    logits = lam * candidate_scores.to(device).float()
    logits = logits.masked_fill(~valid, float("-inf"))
    if gallery_logsumexp is None:
        gallery_logsumexp = torch.logsumexp(logits, dim=1)
    total = (logits - gallery_logsumexp.to(device).unsqueeze(1)) + torch.log_softmax(correction, 1)
    total = total.masked_fill(~valid, float("-inf"))
    order = total.argsort(dim=1, descending=True, stable=True)
    return candidates.gather(1, order), total.gather(1, order)
