"""CCNet: composition + correction networks (Kim, Yu, Kim & Kim, "Dual Compositional
Learning in Interactive Image Retrieval", AAAI 2021; the winning Fashion-IQ 2020 entry,
released as DCNet: github.com/ozmig77/dcnet, ``model/model.py``, ``model/composition.py``).

M = 7 experts, each a D-dim subspace (``expert_dim``):

* Image experts (Eq. 4): the global feature, an intermediate layer (ResNet ``layer3`` /
  DenseNet ``denseblock3``) and five 3x3 windows (top, left, centre, right, bottom) of the
  last map average-pooled to 7x7 (so any input size works), each average-pooled and
  embedded by ``Linear + ReLU`` (dropout 0.2 on the pooled features, as the code).
* Text experts (Eq. 1-3): word embeddings -> ``Conv1d`` (kernel 2) over the words ->
  ``h_t = LeakyReLU(FC([conv_t, w_t]))``; expert m pools the words with its own attention
  ``a^m_t = softmax_t(MLP(e_m * h_t))`` and embeds ``sum_t a^m_t h_t`` by ``Linear + ReLU``.
* Composition network (Eq. 5-8): per expert, TIRG over ``[x, t, fusion(x, t)]``
  (``fusion="mutan"`` as the paper, ``"hadamard"`` as the released config), on experts
  normalised to a learned scale (``NormalizationLayer``, init 5); the score of a target is
  the sum over experts of the cosines, i.e. the dot product of the unit vectors
  ``concat_m(unit(phi_m)) / sqrt(M)`` returned by ``compose``/``embed_target``
  (so the query size is ``model.embed_dim = M * D``; the config sets ``model.expert_dim``,
  D, as TIRG-family configs set ``model.embed_dim``, their query size).
* Correction network (Eq. 10-14): per expert, ``x' = ReLU(FC([x*y, x]))``,
  ``y' = ReLU(FC([x*y, y]))``, ``c = ReLU(FC([x, y' - x', y]))`` (the code's ``FusDiff``);
  its logit is ``s_t^2 * sum_m cos(c_m, t_m)`` with the text normalisation scale ``s_t``.
* Training (Eq. 9): batch classification loss on both networks' (B, B) score matrices.
  ``loss_scale`` starts at ``5 * sqrt(M)`` so the composition logits ``s^2 * cos_mean``
  equal the code's ``5^2 * sum_m cos_m``. Ranking (Eq. 15): ``p = softmax(comp) *
  softmax(corr)``, i.e. the sum of both log-softmaxes (``pipeline.evaluate``).

Deviations from the released code: MUTAN's dropout follows train/eval mode (the code
applies ``F.dropout`` always); the DenseNet intermediate expert is ``denseblock3``'s output
(the code taps after ``transition3``); the paper's 3x3 spatial windows are used (the
released code's final version pools the 1x1 centre cell of each window); the cyclic joint
loss of the released trainer is not part of this model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import ComposedRetrievalModel, Repr
from pipeline.models.checks import check_images, check_repr, check_same_batch, check_text
from pipeline.models.composers.tirg import gate_and_residual, gated_residual
from pipeline.models.encoder_composer import check_positive
from pipeline.models.image_encoder import Backbone
from pipeline.models.registry import register_model
from pipeline.models.word_vectors import load_word_vectors
from pipeline.vocab import PAD_ID

# 3x3 windows (first row, first column) on the 7x7 grid: top, left, centre, right, bottom
SPATIAL_WINDOWS = ((0, 2), (2, 0), (2, 2), (2, 4), (4, 2))
EXPERTS = ("global", "intermediate", "top", "left", "centre", "right", "bottom")
FUSIONS = ("mutan", "hadamard")


def adaptive_pool_weights(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size) averaging weights of ``adaptive_avg_pool1d(size -> out)`` (as matrix
    products they export to ONNX for any static size, unlike adaptive pooling)."""
    i = torch.arange(out, device=like.device)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    j = torch.arange(size, device=like.device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class ExpertImageEncoder(nn.Module):
    """images (B, 3, H, W) -> image experts (B, M, D), Eq. 4."""

    def __init__(self, dim: int, backbone: str, pretrained_path: str | None, dropout: float):
        super().__init__()
        self.backbone = Backbone(backbone, pretrained_path)
        c, c_mid = self.backbone.channels, self.backbone.mid_channels
        self.dropout = nn.Dropout(dropout)
        in_dims = [c, c_mid] + [c] * len(SPATIAL_WINDOWS)
        self.embed = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), nn.ReLU()) for d in in_dims)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mid, last = self.backbone(images)
        rows = adaptive_pool_weights(last.shape[2], 7, last)  # (7, h)
        cols = adaptive_pool_weights(last.shape[3], 7, last)  # (7, w)
        # each window's weights over the original map: mean of its 3 pooled rows/columns
        win_rows = torch.stack([rows[r : r + 3].mean(0) for r, _ in SPATIAL_WINDOWS])  # (5, h)
        win_cols = torch.stack([cols[c : c + 3].mean(0) for _, c in SPATIAL_WINDOWS])  # (5, w)
        spatial = torch.einsum("bchw,sh,sw->sbc", last, win_rows, win_cols)  # (5, B, C)
        pooled = [last.mean(dim=(2, 3)), mid.mean(dim=(2, 3)), *spatial.unbind(0)]
        return torch.stack([embed(self.dropout(p)) for embed, p in zip(self.embed, pooled)], 1)


class ExpertTextEncoder(nn.Module):
    """tokens (B, T), lengths (B,) -> text experts (B, M, D), Eq. 1-3."""

    def __init__(self, vocab_size: int, word_dim: int, dim: int, experts: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)
        self.conv = nn.Conv1d(word_dim, dim, 2, padding=1)
        self.fc = nn.Linear(word_dim + dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.expert_queries = nn.Parameter(nn.init.xavier_uniform_(torch.empty(experts, dim)))
        self.attention = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        self.embed = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(experts)
        )

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        words = self.embedding(tokens)  # (B, T, E)
        # kernel-2 conv padded on both sides; dropping the last step keeps T steps (code)
        conv = F.leaky_relu(self.conv(words.transpose(1, 2)))[:, :, :-1].transpose(1, 2)
        hidden = self.dropout(F.leaky_relu(self.fc(torch.cat([self.dropout(conv), words], 2))))
        position = torch.ones_like(tokens).cumsum(1) - 1  # (B, T): 0..T-1, export-friendly
        valid = position < lengths[:, None]
        hidden = hidden * valid.unsqueeze(2).to(hidden.dtype)
        scores = self.attention(self.expert_queries[None, :, None, :] * hidden[:, None])
        scores = scores.squeeze(3).masked_fill(~valid[:, None, :], torch.finfo(hidden.dtype).min)
        pooled = torch.softmax(scores, dim=2) @ hidden  # (B, M, T) @ (B, T, D) -> (B, M, D)
        return torch.stack([embed(pooled[:, m]) for m, embed in enumerate(self.embed)], 1)


class MutanFusion(nn.Module):
    """MUTAN-style fusion as in the released code (``model/fusion.py``): reduce both inputs
    to ``rank_dim``, expand to ``heads`` projections, multiply, sum over heads, signed
    square root + L2 normalisation, project back to D."""

    def __init__(self, dim: int, rank_dim: int = 256, heads: int = 4, dropout: float = 0.2):
        super().__init__()
        self.heads, self.rank_dim = heads, rank_dim
        self.reduce_x = nn.Linear(dim, rank_dim, bias=False)
        self.reduce_t = nn.Linear(dim, rank_dim, bias=False)
        self.expand_x = nn.Linear(rank_dim, rank_dim * heads)
        self.expand_t = nn.Linear(rank_dim, rank_dim * heads)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(rank_dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.heads, self.rank_dim)
        x = self.expand_x(self.dropout(self.reduce_x(x))).view(shape)
        t = self.expand_t(self.dropout(self.reduce_t(t))).view(shape)
        z = (x * t).sum(-2)
        z = F.normalize(torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z)), dim=-1)
        return self.out(z)


class HadamardFusion(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * t


class ExpertComposer(nn.Module):
    """One expert's composition (Eq. 5-7): TIRG over [x, t, fusion(x, t)] (code ``TIRG``)."""

    def __init__(self, dim: int, fusion: nn.Module, w_g_init: float, w_r_init: float):
        super().__init__()
        self.fusion = fusion
        self.w_g = nn.Parameter(torch.tensor(float(w_g_init)))
        self.w_r = nn.Parameter(torch.tensor(float(w_r_init)))
        self.gate, self.residual = gate_and_residual(3 * dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([x, t, self.fusion(x, t)], dim=1)
        return gated_residual(x, joint, self.gate, self.residual, self.w_g, self.w_r)


class ExpertCorrector(nn.Module):
    """One expert's correction (Eq. 10-13, code ``FusDiff``): (x, y) (..., D) -> (..., D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.before = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())
        self.after = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = x * y
        diff = self.after(torch.cat([both, y], -1)) - self.before(torch.cat([both, x], -1))
        return self.out(torch.cat([x, diff, y], -1))


@register_model("ccnet")
class CCNet(ComposedRetrievalModel):
    """Image repr ``("experts",)`` (B, M, D); text repr ``("experts",)`` (B, M, D);
    query/target (B, M * D) unit vectors; ``correct`` -> (B,) logits."""

    image_repr_names = ("experts",)
    text_repr_names = ("experts",)
    has_correction = True

    def __init__(
        self,
        vocab_size: int,
        expert_dim: int = 512,
        image_backbone: str = "resnet18",
        pretrained_path: str | None = None,
        fusion: str = "hadamard",
        word_dim: int = 300,
        word_vectors_path: str | None = None,
        vocab_words: list[str] | None = None,
        freeze_word_vectors: bool = False,
        dropout: float = 0.2,
        norm_scale_init: float = 5.0,
        w_g_init: float = 1.0,
        w_r_init: float = 10.0,
        mutan_rank: int = 256,
        mutan_heads: int = 4,
        loss_scale_init: float | None = None,
        learn_loss_scale: bool = True,
    ):
        super().__init__()
        check_positive(
            vocab_size=vocab_size,
            expert_dim=expert_dim,
            word_dim=word_dim,
            mutan_rank=mutan_rank,
            mutan_heads=mutan_heads,
            dropout=dropout,
        )
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        m = len(EXPERTS)
        self.vocab_size, self.expert_dim, self.embed_dim = vocab_size, expert_dim, m * expert_dim
        self.image_encoder = ExpertImageEncoder(
            expert_dim, image_backbone, pretrained_path, dropout
        )
        self.text_encoder = ExpertTextEncoder(vocab_size, word_dim, expert_dim, m, dropout)
        if word_vectors_path is not None:
            if vocab_words is None:
                raise ValueError(
                    "word_vectors_path needs vocab_words (the vocabulary's words, "
                    "in id order) to map vectors to ids"
                )
            table = self.text_encoder.embedding.weight
            table.data.copy_(
                load_word_vectors(word_vectors_path, vocab_words, word_dim, table.data)
            )
        self.text_encoder.embedding.weight.requires_grad_(not freeze_word_vectors)

        def fusion_module() -> nn.Module:
            if fusion == "mutan":
                return MutanFusion(expert_dim, mutan_rank, mutan_heads, dropout)
            return HadamardFusion()

        self.composers = nn.ModuleList(
            ExpertComposer(expert_dim, fusion_module(), w_g_init, w_r_init) for _ in range(m)
        )
        self.correctors = nn.ModuleList(ExpertCorrector(expert_dim) for _ in range(m))
        # NormalizationLayer scales of the code: image experts / text experts
        self.image_scale = nn.Parameter(torch.tensor(float(norm_scale_init)))
        self.text_scale = nn.Parameter(torch.tensor(float(norm_scale_init)))
        init = norm_scale_init * math.sqrt(m) if loss_scale_init is None else loss_scale_init
        self.loss_scale = nn.Parameter(
            torch.tensor(float(init)), requires_grad=bool(learn_loss_scale)
        )

    # -- contract ------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> Repr:
        """images (B, 3, H, W) -> (experts (B, M, D),)."""
        check_images(images)
        return (self.image_encoder(images),)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Repr:
        """tokens (B, T), lengths (B,) -> (experts (B, M, D),)."""
        check_text(tokens, lengths, self.vocab_size)
        return (self.text_encoder(tokens, lengths),)

    def compose(self, image_repr: Repr, text_repr: Repr) -> torch.Tensor:
        """-> query (B, M * D) unit vectors, Eq. 5-8."""
        check_repr(image_repr, self.image_repr_names, "image_repr")
        check_repr(text_repr, self.text_repr_names, "text_repr")
        check_same_batch(image_repr=image_repr[0], text_repr=text_repr[0])
        x = self.image_scale * F.normalize(image_repr[0], dim=2)
        t = self.text_scale * F.normalize(text_repr[0], dim=2)
        parts = [
            F.normalize(comp(x[:, m], t[:, m]), dim=1) for m, comp in enumerate(self.composers)
        ]
        return F.normalize(torch.cat(parts, dim=1), dim=1)

    def embed_target(self, image_repr: Repr) -> torch.Tensor:
        """-> target (B, M * D): per-expert unit vectors, concatenated, / sqrt(M)."""
        check_repr(image_repr, self.image_repr_names, "image_repr")
        return F.normalize(F.normalize(image_repr[0], dim=2).flatten(1), dim=1)

    def correction_scores(
        self, ref: torch.Tensor, cand: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """Broadcasting core of Eq. 10-14: experts (..., M, D) -> logits (...)."""
        ref, cand = torch.broadcast_tensors(ref, cand)
        x = self.image_scale * F.normalize(ref, dim=-1)
        y = self.image_scale * F.normalize(cand, dim=-1)
        t = F.normalize(text, dim=-1)
        cos = [
            (F.normalize(corr(x[..., m, :], y[..., m, :]), dim=-1) * t[..., m, :]).sum(-1)
            for m, corr in enumerate(self.correctors)
        ]
        return self.text_scale**2 * torch.stack(cos, dim=-1).sum(-1)

    def correct(self, ref_repr: Repr, cand_repr: Repr, text_repr: Repr) -> torch.Tensor:
        """(reference, candidate, text) triples -> correction logits (B,)."""
        for value, argument in ((ref_repr, "ref_repr"), (cand_repr, "cand_repr")):
            check_repr(value, self.image_repr_names, argument)
        check_repr(text_repr, self.text_repr_names, "text_repr")
        check_same_batch(ref_repr=ref_repr[0], cand_repr=cand_repr[0], text_repr=text_repr[0])
        return self.correction_scores(ref_repr[0], cand_repr[0], text_repr[0])

    def forward(
        self,
        ref_images: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        target_images: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """-> query, target (B, M * D), correction_logits (B, B) (row i: query i against
        every target j of the batch), loss_scale ()."""
        check_same_batch(
            ref_images=ref_images, tokens=tokens, lengths=lengths, target_images=target_images
        )
        ref, target = self.encode_image(ref_images)[0], self.encode_image(target_images)[0]
        text = self.encode_text(tokens, lengths)[0]
        return {
            "query": self.compose((ref,), (text,)),
            "target": self.embed_target((target,)),
            "correction_logits": self.correction_scores(
                ref[:, None], target[None, :], text[:, None]
            ),
            "loss_scale": self.loss_scale,
        }
