"""The query engine: (reference image or gallery id, text) -> top-k gallery ids.

A query composes the reference's image representation with the text (TIRG-style
``compose``), then ranks the gallery by the dot product with its target embeddings
(``serve.search``). A gallery-id reference reuses the representation the index stored
(``repr_<name>.npy``) instead of decoding and encoding its image again (DESIGN.md).
For models with a correction network (CCNet) the top ``rerank_top`` candidates are
re-scored by ``pipeline.rerank.rerank_with_correction`` -- the same function the
evaluation uses, so served and evaluated rankings agree.

Shapes: B queries in a batch, S image side, D embedding size.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from export.artifacts import ArtifactError, load_artifacts
from export.runtime import BACKENDS, open_runtime
from export.runtime.model_api import RuntimeModule
from pipeline.images import ImageGeometryError, check_image_geometry, decode_image
from pipeline.rerank import composition_logit_scale, rerank_with_correction
from serve.gallery import GalleryIndex
from serve.limits import ServiceLimits
from serve.search import DEFAULT_MARGIN, GallerySearch
from serve.sharding import ShardedSearch, read_shards

log = logging.getLogger(__name__)

DEFAULT_RERANK_TOP = 50


class QueryError(ValueError):
    """A query the engine cannot answer because of its input (the HTTP layer's 4xx)."""


class InvalidImageError(QueryError):
    """The reference upload is not a decodable image."""


class ImageTooLargeError(QueryError):
    """The reference upload has more bytes or pixels, a longer side or a more elongated
    shape than allowed."""


class UnknownReferenceError(QueryError, KeyError):
    """A reference id that is not in the gallery index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Query:
    """One query: ``text`` plus exactly one reference, a preprocessed ``image`` (3, S, S)
    from ``QueryEngine.prepare_image`` or a gallery ``ref_id``."""

    text: str
    image: torch.Tensor | None = None
    ref_id: str | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    score: float


@dataclass
class EncodedQueries:
    """A batch through the query network: reference rows (None for uploads), query
    embeddings (B, D), and the image / text representations CCNet's re-ranking reads."""

    rows: list[int | None]
    query: torch.Tensor
    image_repr: dict[str, torch.Tensor]
    text_repr: dict[str, torch.Tensor]

    def split(self) -> list[EncodedQueries]:
        """One ``EncodedQueries`` per query, on the CPU (what a replica sends back)."""
        return [
            EncodedQueries(
                [row],
                self.query[i : i + 1].cpu(),
                {n: t[i : i + 1].cpu() for n, t in self.image_repr.items()},
                {n: t[i : i + 1].cpu() for n, t in self.text_repr.items()},
            )
            for i, row in enumerate(self.rows)
        ]


@dataclass
class BatchResult:
    """Answers of a batch, in query order, and where the time went (milliseconds)."""

    hits: list[list[Hit]]
    timing_ms: dict[str, float] = field(default_factory=dict)


class QueryEngine:
    """Artifacts + gallery index + one backend, answering batches of queries.

    ``backend``: ``torch`` (eager; CUDA graphs per batch bucket on a GPU), ``onnxruntime``
    or ``tensorrt``. ``device``: ``None`` picks CUDA when available. ``index_dir``
    defaults to ``ART_DIR/index``. ``layout`` (``exact``, ``fp16``, ``int8``, ``faiss``)
    and ``margin``/``nprobe`` choose the gallery search (``serve.search``); an index with
    ``shards.json`` is searched shard by shard and merged (``serve.sharding``);
    ``search_gallery=False`` leaves the search to others (a deployment's searchers). Not
    thread-safe: one thread calls ``search`` at a time (the HTTP service runs every batch
    on one worker thread).
    """

    def __init__(
        self,
        art_dir: str | Path,
        backend: str = "torch",
        device: str | torch.device | None = None,
        index_dir: str | Path | None = None,
        *,
        rerank_top: int = DEFAULT_RERANK_TOP,
        max_image_pixels: int = ServiceLimits.max_image_pixels,
        max_image_side: int = ServiceLimits.max_image_side,
        max_aspect_ratio: float = ServiceLimits.max_aspect_ratio,
        chunk_rows: int = 65536,
        max_resident_bytes: int = 4 << 30,
        layout: str = "exact",
        margin: int = DEFAULT_MARGIN,
        nprobe: int | None = None,
        search_gallery: bool = True,
        backend_options: dict[str, Any] | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.artifacts = load_artifacts(art_dir)
        self.art_dir = self.artifacts.dir
        self.device = torch.device(
            device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.model_name = self.artifacts.model_name
        self.embed_dim = self.artifacts.embed_dim
        self.vocab = self.artifacts.vocab
        self.max_text_len = self.artifacts.max_text_len
        self.preprocess = self.artifacts.image_preprocess()
        self.max_image_pixels = int(max_image_pixels)
        self.max_image_side = int(max_image_side)
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.has_correction = self.artifacts.has_correction
        self.rerank_top = int(rerank_top) if self.has_correction else 0
        self.index = GalleryIndex(
            Path(index_dir) if index_dir else self.art_dir / "index",
            repr_names=list(self.artifacts.image_repr_names),
            checkpoint_sha256=self.artifacts.checkpoint_sha256,
        )
        if self.index.embed_dim != self.embed_dim:
            raise ArtifactError(
                f"{self.index.dir}: embed_dim {self.index.embed_dim}, the model's "
                f"is {self.embed_dim}"
            )
        self.backend = open_runtime(self.artifacts, backend, self.device, **(backend_options or {}))
        if self.has_correction:
            self._correction_model = RuntimeModule(self.backend)
            self._logit_scale = composition_logit_scale(self._correction_model)
        self.gallery = (
            None
            if not search_gallery
            else gallery_search(
                self.index,
                self.device,
                chunk_rows=chunk_rows,
                max_resident_bytes=max_resident_bytes,
                layout=layout,
                margin=margin,
                nprobe=nprobe,
            )
        )
        log.info(
            "query engine: %s, %d gallery images, %s on %s",
            self.model_name,
            len(self.index),
            self.backend.describe,
            self.device,
        )

    # -- inputs -------------------------------------------------------------------------------
    def prepare_image(self, data: bytes) -> torch.Tensor:
        """Encoded upload -> preprocessed float32 (3, S, S) on the CPU.

        Raises ``InvalidImageError`` for bytes that are not an image and
        ``ImageTooLargeError`` for more than ``max_image_pixels`` pixels, a side over
        ``max_image_side`` or an aspect ratio over ``max_aspect_ratio`` (read from the
        header, before decoding). Every mode (16-bit, palette, LA, CMYK, I, F) becomes
        the same 8-bit RGB picture (``pipeline.images.decode_image``).
        """
        if not data:
            raise InvalidImageError("the image upload is empty")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(f"the image has too many pixels: {err}") from err
        except UnidentifiedImageError as err:
            raise InvalidImageError(
                f"the upload ({len(data)} bytes) is not an image in a known "
                "format (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)"
            ) from err
        except (OSError, ValueError, SyntaxError) as err:
            raise InvalidImageError(
                f"the upload ({len(data)} bytes) is not an image that can be decoded: {err}"
            ) from err
        try:
            check_image_geometry(
                width,
                height,
                max_pixels=self.max_image_pixels,
                max_side=self.max_image_side,
                max_aspect_ratio=self.max_aspect_ratio,
            )
        except ImageGeometryError as err:
            raise ImageTooLargeError(str(err)) from err
        try:
            pixels = decode_image(data)
        except ValueError as err:
            raise InvalidImageError(f"the upload cannot be decoded: {err}") from err
        return self.preprocess(pixels)

    def row_of(self, ref_id: str) -> int:
        """Index row of a gallery id; ``UnknownReferenceError`` when it is not there."""
        row = self.index.row_of.get(ref_id)
        if row is None:
            raise UnknownReferenceError(
                f"ref_id {ref_id!r} is not in the gallery index ({len(self.index)} images)"
            )
        return row

    # -- answering ----------------------------------------------------------------------------
    def query(
        self,
        text: str,
        image: bytes | None = None,
        ref_id: str | None = None,
        k: int = 10,
        exclude_reference: bool = True,
    ) -> list[Hit]:
        """One query from raw inputs: uploaded image bytes or a gallery id, and a text."""
        tensor = self.prepare_image(image) if image is not None else None
        return self.search([Query(text, tensor, ref_id)], k, exclude_reference).hits[0]

    def search(
        self, queries: Sequence[Query], k: int = 10, exclude_reference: bool = True
    ) -> BatchResult:
        """Answer a batch: top-``k`` hits per query, best first.

        With ``exclude_reference`` a gallery-id reference is not returned as its own answer.
        The three steps are ``encode`` (the query network), the gallery search, and
        ``finish`` (CCNet's re-ranking, ids); a deployment runs them on different replicas.
        """
        self.check(queries, k)
        start = time.perf_counter()
        encoded = self.encode(queries)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        encode_done = time.perf_counter()
        excluded = encoded.rows if exclude_reference else None
        scores, found = self.gallery.search(encoded.query, self.candidates(k), excluded)
        searched = time.perf_counter()
        hits = self.finish(encoded, scores, found, k)
        done = time.perf_counter()
        timing = {
            "encode_ms": (encode_done - start) * 1e3,
            "search_ms": (searched - encode_done) * 1e3,
            "rerank_ms": (done - searched) * 1e3,
            "engine_ms": (done - start) * 1e3,
        }
        return BatchResult(hits, timing)

    def check(self, queries: Sequence[Query], k: int) -> None:
        """``QueryError`` for a batch the engine cannot answer (before any work)."""
        if not queries:
            raise QueryError("search() got no queries")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be a positive int, got {k!r}")
        for q in queries:
            if (q.image is None) == (q.ref_id is None):
                raise QueryError("each query needs exactly one reference: an image or a ref_id")
            if not isinstance(q.text, str):
                raise QueryError(f"query text must be a str, got {type(q.text).__name__}")

    def candidates(self, k: int) -> int:
        """How many results the gallery search returns for top-``k`` (CCNet re-ranks more)."""
        return max(k, self.rerank_top)

    def encode(self, queries: Sequence[Query]) -> EncodedQueries:
        """The query network over a batch: reference representations (encoded uploads or
        stored rows), texts, and the composed (B, D) query embeddings."""
        rows = [self.row_of(q.ref_id) if q.ref_id is not None else None for q in queries]
        image_repr = self._reference_reprs(queries, rows)
        tokens, lengths = self.vocab.encode([q.text for q in queries], max_len=self.max_text_len)
        query_emb, text_repr = self.backend.compose_query(image_repr, tokens, lengths)
        return EncodedQueries(rows, query_emb, image_repr, text_repr)

    def finish(
        self, encoded: EncodedQueries, scores: torch.Tensor, found: torch.Tensor, k: int
    ) -> list[list[Hit]]:
        """Hits from the search's (B, C) scores and rows: re-ranked by CCNet's correction
        network first where the model has one."""
        if self.has_correction:
            scores, found = self._rerank(encoded.image_repr, encoded.text_repr, scores, found)
        return [
            [
                Hit(self.index.ids[r], float(s))
                for s, r in zip(srow[:k], rrow[:k])
                if s != float("-inf")
            ]  # an excluded reference in a gallery smaller than k
            for srow, rrow in zip(scores.tolist(), found.tolist())
        ]

    def _reference_reprs(
        self, queries: Sequence[Query], rows: list[int | None]
    ) -> dict[str, torch.Tensor]:
        """Image representation of every reference, (B, ...) per repr name, in query order:
        uploads are encoded in one batch, gallery ids read from the index's stored rows."""
        uploads = [i for i, q in enumerate(queries) if q.image is not None]
        stored = [i for i, r in enumerate(rows) if r is not None]
        parts: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
        if uploads:
            images = torch.stack([queries[i].image for i in uploads]).to(self.device)
            for name, value in self.backend.encode_image(images).items():
                parts.setdefault(name, []).append((uploads, value))
        if stored:
            gathered = self.index.gather_reprs(np.asarray([rows[i] for i in stored]))
            for name, value in gathered.items():
                parts.setdefault(name, []).append((stored, torch.from_numpy(value).to(self.device)))
        reprs = {}
        for name, pieces in parts.items():
            if len(pieces) == 1 and len(pieces[0][0]) == len(queries):
                reprs[name] = pieces[0][1]
                continue
            shape = pieces[0][1].shape[1:]
            full = torch.empty((len(queries), *shape), dtype=torch.float32, device=self.device)
            for positions, value in pieces:
                full[torch.as_tensor(positions, device=self.device)] = value.float()
            reprs[name] = full
        return reprs

    def _rerank(
        self,
        ref_repr: dict[str, torch.Tensor],
        text_repr: dict[str, torch.Tensor],
        scores: torch.Tensor,
        rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CCNet: re-rank the (B, C) candidates with evaluation's ``rerank_with_correction``
        (CCNet Eq. 15). Returns (scores (B, C), rows (B, C)) best first; the scores are
        Eq. 15's log-probabilities over the candidates, empty slots ``-inf``."""
        valid = torch.isfinite(scores)
        unique, local = torch.unique(rows.clamp(min=0), return_inverse=True)
        stored = self.index.gather_reprs(unique.numpy())
        gallery_repr = tuple(
            torch.from_numpy(stored[n]).to(self.device) for n in self.artifacts.image_repr_names
        )
        order, total = rerank_with_correction(
            self._correction_model,
            ref_repr=_as_tuple(ref_repr, self.artifacts.image_repr_names),
            text_repr=_as_tuple(text_repr, self.artifacts.text_repr_names),
            gallery_repr=gallery_repr,
            candidates=torch.where(valid, local, -1),
            candidate_scores=scores,
            logit_scale=self._logit_scale,
        )
        order = order.cpu()
        return total.float().cpu(), torch.where(order >= 0, unique[order.clamp(min=0)], -1)

    def warmup(self, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> None:
        """Capture CUDA graphs / run each batch size once before traffic arrives."""
        self.backend.warmup(batch_sizes)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "backend": self.backend.name,
            "backend_detail": self.backend.describe,
            "device": str(self.device),
            "gallery_size": len(self.index),
            "embed_dim": self.embed_dim,
            "search_layout": self.gallery.layout if self.gallery is not None else "remote",
            "has_correction": self.has_correction,
        }

    def close(self) -> None:
        self.index.close()


def _as_tuple(reprs: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    return tuple(reprs[n] for n in names)


def gallery_search(index: GalleryIndex, device: torch.device, **options):
    """The index's search: one ``GallerySearch``, or a ``ShardedSearch`` over the row
    ranges of its ``shards.json``."""
    try:
        ranges = read_shards(index.dir, len(index))
    except ValueError as err:
        raise ArtifactError(str(err)) from None
    if ranges is None:
        return GallerySearch(index.embeddings, device, index_dir=index.dir, **options)
    return ShardedSearch(index.embeddings, ranges, device, index_dir=index.dir, **options)
