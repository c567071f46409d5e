"""HTTP service over a ``QueryEngine`` (FastAPI): search, gallery images, demo page.

Endpoints::

    POST /search          multipart: ``image`` (file) or ``ref_id``, ``text``, ``k``
                          -> {"results": [{"id", "score", "image_url"}], "timing": {...}, ...}
    GET  /images/{id}     the catalogue image's bytes from the index (content type by ext)
    GET  /gallery/sample  ``n`` random gallery ids with thumbnails' URLs (the demo's picker)
    GET  /healthz         model, backend, device, gallery size, batches served
    GET  /                the demo page (serve/static, no external resources)
    GET  /docs            OpenAPI docs (FastAPI's Swagger UI; /openapi.json is the schema)

Every input error is a 4xx with ``{"error": code, "detail": message}``; ids are looked
up in the index and never touch the filesystem. Concurrent searches are micro-batched
(``serve.batching``). Overload is a 503 with ``Retry-After``: a full queue, a query that
waited ``queue_timeout_s``, or too many uploads in flight (``serve.guards``). A client
that disconnects before its answer has its queued work dropped. The limits and timeouts
are ``serve.limits.ServiceLimits``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at
# definition time, and some of them use this module's local limits.
import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.batching import MicroBatcher, QueueFullError, QueueTimeoutError, default_batching
from serve.engine import (
    Hit,
    ImageTooLargeError,
    InvalidImageError,
    QueryEngine,
    UnknownReferenceError,
)
from serve.engine import Query as EngineQuery
from serve.guards import RequestGuard
from serve.limits import BODY_OVERHEAD_BYTES, ServiceLimits

__all__ = ["BODY_OVERHEAD_BYTES", "ServiceLimits", "create_app", "STATIC_DIR"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


class ApiError(Exception):
    """An input error answered as ``status`` with ``{"error": code, "detail": detail}``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def error_response(
    status: int, code: str, detail: Any, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def image_url(image_id: str) -> str:
    return "/images/" + quote(image_id, safe="")


def create_app(
    engine: QueryEngine,
    limits: ServiceLimits | None = None,
    *,
    max_batch: int | None = None,
    max_wait_ms: float | None = None,
    answer: Callable[[EngineQuery, int], Awaitable[tuple[list[Hit], dict]]] | None = None,
) -> FastAPI:
    """The FastAPI app over ``engine``. Batching defaults: on a GPU up to 64 queries
    collected for up to 2 ms; on the CPU up to 16, never waiting (what is queued runs).

    ``answer(query, k) -> (hits, info)`` replaces the micro-batcher: the Ray Serve
    deployment (``serve.deployment``) answers each request through its query-network
    replicas (batched there by ``@serve.batch``) and gallery searchers.
    """
    limits = limits or ServiceLimits()
    default_batch, default_wait_ms = default_batching(engine.device.type == "cuda")
    batcher = None
    if answer is None:
        batcher = MicroBatcher(
            lambda items: _run_batch(engine, items),
            max_batch=max_batch if max_batch is not None else default_batch,
            max_wait_ms=max_wait_ms if max_wait_ms is not None else default_wait_ms,
            max_queue=limits.max_queue,
        )

        async def answer(query: EngineQuery, k: int) -> tuple[list[Hit], dict]:
            return await batcher.submit((query, k), timeout=limits.queue_timeout_s)

    decode_slots = asyncio.Semaphore(limits.concurrent_decodes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if batcher is not None:
            await batcher.start()
        try:
            yield
        finally:
            if batcher is not None:
                await batcher.stop()

    app = FastAPI(
        title="Composed image retrieval",
        version="1",
        description="Search a catalogue with a reference image and a text saying "
        "what should change.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits
    app.add_middleware(
        RequestGuard,
        max_body_bytes=limits.max_body_bytes,
        body_timeout_s=limits.body_timeout_s,
        max_pending_uploads=limits.max_pending_uploads,
    )
    _add_error_handlers(app)

    @app.post("/search", summary="Top-k gallery images for a reference and a change text")
    async def search(
        request: Request,
        text: Annotated[str | None, Form(description="what should change")] = None,
        image: Annotated[UploadFile | None, File(description="reference image upload")] = None,
        ref_id: Annotated[str | None, Form(description="a gallery id as the reference")] = None,
        k: Annotated[int, Form(description="number of results")] = 10,
    ) -> dict[str, Any]:
        began = time.perf_counter()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"POST /search takes multipart/form-data, got {media_type or 'no body'!r}",
            )
        text = _check_text(text, limits)
        if image is not None and not image.filename and not image.size:
            image = None  # an empty file field (a form posted with no file chosen)
        if (image is None) == (ref_id is None or ref_id == ""):
            raise ApiError(
                422,
                "reference_required" if image is None else "reference_conflict",
                "give exactly one reference: an image file or a ref_id"
                + (" (both were given)" if image is not None else ""),
            )
        if not 1 <= k <= min(limits.max_k, len(engine.index)):
            raise ApiError(
                422,
                "k_out_of_range",
                f"k must be between 1 and {min(limits.max_k, len(engine.index))}, got {k}",
            )
        reference: dict[str, Any]
        if image is not None:
            data = await image.read(limits.max_image_bytes + 1)
            if len(data) > limits.max_image_bytes:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"the image upload exceeds {limits.max_image_bytes} bytes",
                )
            tensor = await _unless_disconnected(request, _decode(decode_slots, engine, data))
            query = EngineQuery(text=text, image=tensor)
            reference = {"upload": {"filename": image.filename, "bytes": len(data)}}
        else:
            engine.row_of(ref_id)  # unknown ids fail here, not inside a batch
            query = EngineQuery(text=text, ref_id=ref_id)
            reference = {"ref_id": ref_id, "image_url": image_url(ref_id)}
        prepared = time.perf_counter()
        hits, info = await _unless_disconnected(
            request, asyncio.wait_for(answer(query, k), limits.queue_timeout_s)
        )
        done = time.perf_counter()
        timing = {
            "total_ms": (done - began) * 1e3,
            "prepare_ms": (prepared - began) * 1e3,
            **{key: value for key, value in info.items()},
        }
        return {
            "results": [{"id": h.id, "score": h.score, "image_url": image_url(h.id)} for h in hits],
            "k": k,
            "text": text,
            "reference": reference,
            "model": engine.model_name,
            "backend": engine.backend.name,
            "timing": timing,
        }

    @app.get(
        "/images/{image_id:path}",
        summary="A gallery image's encoded bytes",
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
    )
    async def gallery_image(image_id: str) -> Response:
        row = engine.index.row_of.get(image_id)
        if row is None:
            raise ApiError(404, "unknown_image_id", f"no gallery image with id {image_id!r}")
        return Response(
            engine.index.image_bytes(row),
            media_type=engine.index.content_type(row),
            headers={"Cache-Control": "public, max-age=3600"},
        )

    @app.get("/gallery/sample", summary="Random gallery images (the demo's reference picker)")
    async def gallery_sample(
        n: Annotated[int, Query(ge=1, le=limits.max_sample)] = 12,
        seed: Annotated[int | None, Query()] = None,
    ) -> dict[str, Any]:
        rows = random.Random(seed).sample(range(len(engine.index)), min(n, len(engine.index)))
        items = []
        for row in rows:
            meta = engine.index.meta(row)
            items.append(
                {
                    "id": engine.index.ids[row],
                    "image_url": image_url(engine.index.ids[row]),
                    **{key: meta[key] for key in ("label", "caption", "category") if key in meta},
                }
            )
        return {"items": items, "gallery_size": len(engine.index)}

    @app.get("/healthz", summary="Liveness and what is being served")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            **engine.describe(),
            **(
                {
                    "batches": batcher.batches,
                    "queries": batcher.items,
                    "dropped_queries": batcher.dropped,
                }
                if batcher is not None
                else {}
            ),
            "limits": {
                "max_image_bytes": limits.max_image_bytes,
                "max_text_chars": limits.max_text_chars,
                "max_k": limits.max_k,
            },
        }

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _check_text(text: str | None, limits: ServiceLimits) -> str:
    if text is None or not text.strip():
        raise ApiError(422, "empty_text", "text is required: say what should change")
    if len(text) > limits.max_text_chars:
        raise ApiError(
            422,
            "text_too_long",
            f"text has {len(text)} characters; at most {limits.max_text_chars} are accepted",
        )
    return text.strip()


class ClientGone(Exception):
    """The client disconnected before its answer: its work was cancelled."""


async def _decode(slots: asyncio.Semaphore, engine: QueryEngine, data: bytes):
    """Decode an upload in a worker thread once one of the decode slots is free."""
    async with slots:
        return await run_in_threadpool(engine.prepare_image, data)


async def _unless_disconnected(request: Request, work):
    """Await ``work`` unless the client disconnects first: then cancel it (a queued query
    is dropped before its batch runs) and raise ``ClientGone``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return when the server reports the client gone (the body was read already, so
    the next message is ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _run_batch(
    engine: QueryEngine, items: list[tuple[EngineQuery, int]]
) -> tuple[list[list[Hit]], dict[str, float]]:
    """Runs on the batcher's worker thread: one engine call for the whole batch."""
    k = max(k for _, k in items)
    result = engine.search([query for query, _ in items], k)
    return [hits[:k] for hits, (_, k) in zip(result.hits, items)], result.timing_ms


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.code, err.detail)

    @app.exception_handler(InvalidImageError)
    async def invalid_image(request: Request, err: InvalidImageError) -> JSONResponse:
        return error_response(400, "invalid_image", str(err))

    @app.exception_handler(ImageTooLargeError)
    async def image_too_large(request: Request, err: ImageTooLargeError) -> JSONResponse:
        return error_response(413, "image_too_large", str(err))

    @app.exception_handler(UnknownReferenceError)
    async def unknown_reference(request: Request, err: UnknownReferenceError) -> JSONResponse:
        return error_response(404, "unknown_ref_id", str(err))

    @app.exception_handler(QueueFullError)
    @app.exception_handler(QueueTimeoutError)
    @app.exception_handler(TimeoutError)  # answer() past queue_timeout_s
    async def overloaded(request: Request, err: Exception) -> JSONResponse:
        detail = str(err) or "no answer within the queue timeout (queue_timeout_s)"
        return error_response(503, "overloaded", detail, headers={"Retry-After": "1"})

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, err: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; uvicorn drops the write

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: "
            f"{e.get('msg', 'invalid')}"
            for e in err.errors()
        )
        return error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "request_too_large",
        }
        return error_response(
            err.status_code,
            codes.get(err.status_code, "http_error"),
            str(err.detail),
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the server failed on this request")
