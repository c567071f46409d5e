"""The query service on Ray Serve: the same FastAPI app (``serve.app.create_app``) as
an ingress deployment over query-network replicas and one gallery searcher per shard.

    serve run serve.deployment:app artifacts=ART_DIR           # locally
    serve deploy serve_config.yaml                              # on a cluster

Deployments (``build_app(args)``; every key of ``DeploymentSettings`` is an ``args``
entry of ``serve_config.yaml``):

* ``QueryNetwork`` (``query_replicas``, or ``query_autoscaling``): the exported model
  (``export.runtime``) and the index's stored representations; ``encode`` micro-batches
  concurrent queries with ``@serve.batch`` (``max_batch``, ``batch_wait_ms``).
* ``GallerySearcher<i>``, one per row range of ``index/shards.json`` (one in all for an
  unsharded index): ``serve.sharding.ShardSearch`` in the chosen ``layout``.
* ``Ingress``: the FastAPI app with its limits and guards; a request's query is encoded
  by a query-network replica, searched by every searcher at once, the per-shard top-k
  merged (``merge_shard_results``: the single-shard answer), and finished by the same
  ``QueryEngine.finish`` (CCNet's re-ranking, ids) as the standalone service.

The standalone ``python -m serve`` keeps its own micro-batcher; the logic is one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import serve

from export.runtime import precision_options
from serve.batching import GPU_BATCHING
from serve.engine import DEFAULT_RERANK_TOP, EncodedQueries, Query, QueryEngine
from serve.limits import ServiceLimits
from serve.search import DEFAULT_MARGIN
from serve.sharding import ShardSearch, index_shards, merge_shard_results, shard_dir


@dataclass(frozen=True)
class DeploymentSettings:
    """What ``serve_config.yaml``'s ``args`` (or ``serve run ... key=value``) can set."""

    artifacts: str
    backend: str = "onnxruntime"
    precision: str | None = None  # tensorrt fp32 | fp16, onnxruntime fp32 | int8
    device: str = "cpu"
    layout: str = "exact"
    margin: int = DEFAULT_MARGIN
    nprobe: int | None = None
    rerank_top: int = DEFAULT_RERANK_TOP
    query_replicas: int = 1
    query_autoscaling: dict | None = None  # min_replicas, max_replicas, target_ongoing_requests
    query_cpus: float = 1.0
    query_gpus: float = 0.0
    searcher_cpus: float = 1.0
    searcher_gpus: float = 0.0
    ingress_replicas: int = 1
    ingress_cpus: float = 1.0
    max_batch: int = GPU_BATCHING[0]
    batch_wait_ms: float = GPU_BATCHING[1]
    app_name: str = "default"
    limits: dict = field(default_factory=dict)  # ServiceLimits fields

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> DeploymentSettings:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown deployment settings {unknown}; known: {sorted(known)}")
        if "artifacts" not in args:
            raise ValueError("the deployment needs artifacts=ART_DIR (with index/)")
        values = {}
        for name, value in args.items():
            kind = known[name].type
            if isinstance(value, str) and kind in ("int", "float", "int | None"):
                value = float(value) if kind == "float" else int(value)
            values[name] = value
        settings = cls(**values)
        ServiceLimits(**settings.limits)  # fails early, naming a bad limit
        precision_options(settings.backend, settings.precision)  # and a bad precision
        return settings


@serve.deployment(name="QueryNetwork")
class QueryNetwork:
    """The query network over micro-batches of queries (one ``encode`` call each)."""

    def __init__(self, settings: DeploymentSettings):
        self.engine = QueryEngine(
            settings.artifacts,
            backend=settings.backend,
            device=settings.device,
            rerank_top=settings.rerank_top,
            search_gallery=False,
            backend_options=precision_options(settings.backend, settings.precision),
        )
        self.encode = serve.batch(
            max_batch_size=settings.max_batch, batch_wait_timeout_s=settings.batch_wait_ms / 1e3
        )(self._encode_batch)

    async def _encode_batch(self, queries: list[Query]) -> list[EncodedQueries]:
        return self.engine.encode(queries).split()

    async def encode_one(self, query: Query) -> EncodedQueries:
        return await self.encode(query)

    def check_health(self) -> None:
        if self.engine.backend is None:
            raise RuntimeError("the query network is not loaded")


@serve.deployment(name="GallerySearcher")
class GallerySearcher:
    """One shard of the gallery (rows of ``index/shards.json``) in ``layout``."""

    def __init__(self, settings: DeploymentSettings, shard: int):
        from serve.gallery import GalleryIndex

        self.index = GalleryIndex(Path(settings.artifacts) / "index")
        ranges = index_shards(self.index.dir, len(self.index))
        start, end = ranges[shard]
        self.searcher = ShardSearch(
            self.index.embeddings,
            start,
            end,
            "cpu" if settings.searcher_gpus == 0 else settings.device,
            layout=settings.layout,
            margin=settings.margin,
            nprobe=settings.nprobe,
            index_dir=shard_dir(self.index.dir, shard, len(ranges)),
        )

    def search(
        self, queries: torch.Tensor, k: int, excluded: list[int | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.searcher.search(queries, k, excluded)

    def check_health(self) -> None:
        if self.searcher is None:
            raise RuntimeError("the gallery shard is not loaded")


def ingress_app(settings: DeploymentSettings, searchers: int):
    """The FastAPI app of an ingress replica (built on the replica, by Ray Serve)."""
    from serve.app import create_app

    engine = QueryEngine(
        settings.artifacts,
        backend=settings.backend,
        device="cpu",
        rerank_top=settings.rerank_top,
        search_gallery=False,
    )
    query = serve.get_deployment_handle("QueryNetwork", app_name=settings.app_name)
    shards = [
        serve.get_deployment_handle(f"GallerySearcher{i}", app_name=settings.app_name)
        for i in range(searchers)
    ]

    async def answer(item: Query, k: int):
        engine.check([item], k)
        began = time.perf_counter()
        encoded = await query.encode_one.remote(item)
        encode_done = time.perf_counter()
        wanted = engine.candidates(k)
        parts = await asyncio.gather(
            *(s.search.remote(encoded.query, wanted, encoded.rows) for s in shards)
        )
        scores, rows = merge_shard_results(parts, wanted)
        searched = time.perf_counter()
        hits = engine.finish(encoded, scores, rows, k)[0]
        done = time.perf_counter()
        return hits, {
            "encode_ms": (encode_done - began) * 1e3,
            "search_ms": (searched - encode_done) * 1e3,
            "rerank_ms": (done - searched) * 1e3,
            "engine_ms": (done - began) * 1e3,
            "batch_size": 1,
            "shards": len(shards),
        }

    return create_app(engine, ServiceLimits(**settings.limits), answer=answer)


def app_builder(settings: DeploymentSettings, searchers: int):
    """A function (Ray Serve takes a builder only as a plain function) that builds the
    ingress app on its replica."""

    def build():
        return ingress_app(settings, searchers)

    return build


def build_app(args: dict[str, Any]):
    """The Ray Serve application for ``args`` (``DeploymentSettings`` keys)."""
    from serve.gallery import GalleryIndex

    settings = DeploymentSettings.from_args(dict(args))
    index = GalleryIndex(Path(settings.artifacts) / "index")
    searchers = len(index_shards(index.dir, len(index)))
    index.close()
    scaling = (
        {"autoscaling_config": settings.query_autoscaling}
        if settings.query_autoscaling
        else {"num_replicas": settings.query_replicas}
    )
    query = QueryNetwork.options(
        ray_actor_options={"num_cpus": settings.query_cpus, "num_gpus": settings.query_gpus},
        **scaling,
    ).bind(settings)
    shards = [
        GallerySearcher.options(
            name=f"GallerySearcher{i}",
            num_replicas=1,
            ray_actor_options={
                "num_cpus": settings.searcher_cpus,
                "num_gpus": settings.searcher_gpus,
            },
        ).bind(settings, i)
        for i in range(searchers)
    ]
    ingress = serve.deployment(
        serve.ingress(app_builder(settings, searchers))(_Ingress),
        name="Ingress",
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_cpus},
    )
    return ingress.bind(query, *shards)


class _Ingress:
    """The ingress replica; its routes come from ``ingress_app``. The bound query and
    searcher deployments are its arguments so the application deploys them."""

    def __init__(self, *deployments):
        self.deployments = deployments


app = build_app  # `serve run serve.deployment:app artifacts=ART_DIR`: Serve passes the args
