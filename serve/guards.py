"""ASGI guard in front of the query app: body size, body deadline, uploads in flight.

``RequestGuard`` answers before the app sees a request (or instead of its answer):

* 413 for a body over ``max_body_bytes``: at once for a declared Content-Length, or as
  soon as a streamed body passes it;
* 408 when the body has not fully arrived ``body_timeout_s`` after the request head (a
  client that sends headers and stalls no longer holds a connection and a task);
* 503 with ``Retry-After`` when ``max_pending_uploads`` image uploads are already in
  flight (received, waiting for a decode slot, or decoding). It is checked before the
  body is parsed, so a burst of large uploads costs at most that many bodies of memory
  instead of one per request (a refused body is read and dropped a chunk at a time, so
  the client reads the 503 instead of a reset mid-upload). A request counts as an upload when its declared body is
  larger than ``UPLOAD_BYTES`` or it declares none (chunked).

When the last upload in flight finishes, freed heap pages go back to the system
(glibc's ``malloc_trim``), so a burst does not leave the process hundreds of MB larger.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import time

log = logging.getLogger(__name__)

# A search by ref_id is a few hundred bytes; anything larger carries an image.
UPLOAD_BYTES = 16 * 1024


class RequestGuard:
    """ASGI middleware enforcing the body limits of ``serve.limits.ServiceLimits``."""

    def __init__(
        self,
        app,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        max_pending_uploads: int,
        retry_after_s: int = 1,
    ):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.body_timeout_s = float(body_timeout_s)
        self.max_pending_uploads = int(max_pending_uploads)
        self.retry_after = str(int(retry_after_s))
        self.uploads_in_flight = 0
        self.refused_uploads = 0
        self._trim = _malloc_trim()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        size = None
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_json(send, 400, "bad_request", "Content-Length is not a number")
                return
            if size > self.max_body_bytes:
                await send_json(
                    send,
                    413,
                    "request_too_large",
                    f"request body of {size} bytes exceeds {self.max_body_bytes}",
                )
                return
        has_body = scope.get("method") in ("POST", "PUT", "PATCH")
        upload = has_body and (size is None or size > UPLOAD_BYTES)
        if upload and self.uploads_in_flight >= self.max_pending_uploads:
            self.refused_uploads += 1
            await self._discard_body(receive)
            await send_json(
                send,
                503,
                "overloaded",
                f"{self.uploads_in_flight} image uploads are in flight already (at most "
                f"{self.max_pending_uploads}); retry shortly",
                headers=[(b"retry-after", self.retry_after.encode())],
            )
            return
        if upload:
            self.uploads_in_flight += 1
        try:
            await self._guarded(scope, receive, send, has_body and size != 0)
        finally:
            if upload:
                self.uploads_in_flight -= 1
                if self.uploads_in_flight == 0 and self._trim is not None:
                    self._trim(0)

    async def _discard_body(self, receive) -> None:
        """Read a refused body chunk by chunk and drop it (within the body deadline), so
        the client is reading when the 503 comes instead of seeing a reset mid-upload."""
        deadline = time.monotonic() + self.body_timeout_s
        received = 0
        while received <= self.max_body_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _guarded(self, scope, receive, send, expects_body: bool) -> None:
        received = 0
        problem: tuple[int, str, str] | None = None
        body_done = not expects_body
        deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive():
            nonlocal received, problem, body_done
            if body_done:  # after the body: only http.disconnect is left, no deadline
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                problem = (
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                )
                raise _Refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    problem = (
                        413,
                        "request_too_large",
                        f"request body exceeds {self.max_body_bytes} bytes",
                    )
                    raise _Refused
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def guarded_send(message) -> None:
            if problem is None:  # the app's own answer to a refused body is replaced below
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _Refused:
            pass
        except Exception:
            if problem is None:
                raise
        if problem is not None:
            await send_json(send, *problem)


class _Refused(Exception):
    """Raised into the app's receive() when the guard refuses the body."""


async def send_json(send, status: int, code: str, detail: str, headers=()) -> None:
    """A complete JSON error response ``{"error": code, "detail": detail}`` that closes
    the connection (the rest of a refused body is never read)."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _malloc_trim():
    """glibc's ``malloc_trim`` (returns freed heap pages to the OS), or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
