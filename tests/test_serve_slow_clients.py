"""The query service under slow, idle and vanishing clients and upload bursts, on a real
uvicorn on a loopback port configured as ``python -m serve`` configures it."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import httpx
import numpy as np
from fastapi.testclient import TestClient
from hostile_inputs import (
    encode,
)
from PIL import Image
from serve_fixtures import ServerThread

from serve.app import ServiceLimits, create_app

# -- 4-6. slow clients, idle sockets, disconnects and upload bursts (live server) -----------
TIMEOUT_LIMITS = ServiceLimits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=1)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed ``sock`` within ``seconds``, what it sent first)."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
        return True, received
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received


def test_idle_sockets_and_stalled_heads_and_bodies_are_closed(engine):
    with ServerThread(create_app(engine, TIMEOUT_LIMITS), TIMEOUT_LIMITS) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(50)]
        head = socket.create_connection((host, int(port)))
        head.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-")
        body = socket.create_connection((host, int(port)))
        body.sendall(
            b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=zz\r\nContent-Length: 5000\r\n\r\n--zz\r\n"
        )
        began = time.monotonic()
        results = [_closed_within(s, 3.0) for s in [*idle, head, body]]
        waited = time.monotonic() - began
        assert all(closed for closed, _ in results), sum(not c for c, _ in results)
        assert waited < 3.0
        assert b" 408 " in results[-1][1].split(b"\r\n")[0]  # the stalled body got an answer
        # and the service still answers
        response = httpx.post(f"{url}/search", data={"ref_id": engine.index.ids[0], "text": "x"})
        assert response.status_code == 200
        for s in [*idle, head, body]:
            s.close()


def test_a_query_over_its_deadline_gets_503_with_retry_after(engine):
    class Stuck:
        def __getattr__(self, name):
            return getattr(engine, name)

        def search(self, queries, k, exclude_reference=True):
            time.sleep(1.0)
            return engine.search(queries, k, exclude_reference)

    limits = ServiceLimits(queue_timeout_s=0.2)
    with TestClient(create_app(Stuck(), limits)) as client:
        response = client.post("/search", data={"ref_id": engine.index.ids[0], "text": "x"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"] == "overloaded"


class SlowEngine:
    """The engine, each batch taking ``delay`` s longer, remembering what it computed."""

    def __init__(self, engine, delay: float):
        self._engine, self.delay, self.computed = engine, delay, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def search(self, queries, k, exclude_reference=True):
        time.sleep(self.delay)
        self.computed.extend(q.ref_id for q in queries)
        return self._engine.search(queries, k, exclude_reference)


def test_work_for_clients_that_left_is_not_run(engine):
    slow = SlowEngine(engine, delay=1.5)
    limits = ServiceLimits()
    with ServerThread(create_app(slow, limits, max_batch=64), limits) as url:
        host, port = url.removeprefix("http://").split(":")
        first = threading.Thread(
            target=httpx.post,
            args=(f"{url}/search",),
            kwargs={"data": {"ref_id": engine.index.ids[0], "text": "x"}, "timeout": 30},
        )
        first.start()
        time.sleep(0.3)  # the first batch is running: what follows queues behind it
        leavers = []
        for i in range(1, 21):
            body = f"ref_id={engine.index.ids[i]}&text=red".encode()
            sock = socket.create_connection((host, int(port)))
            sock.sendall(
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/x-www-form-urlencoded\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            leavers.append(sock)
        time.sleep(0.3)  # queued: their clients give up
        for sock in leavers:
            sock.close()
        first.join(timeout=30)
        time.sleep(0.5)
        health = httpx.get(f"{url}/healthz").json()
    assert slow.computed == [engine.index.ids[0]], slow.computed
    assert health["dropped_queries"] == 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_burst_of_large_uploads_stays_within_its_memory_bound(engine):
    rng = np.random.default_rng(0)
    noise = encode(Image.fromarray(rng.integers(0, 256, (1500, 1800, 3), dtype=np.uint8)))
    limits = ServiceLimits(max_image_bytes=9 * 1024 * 1024, max_pending_uploads=3)
    assert len(noise) < limits.max_image_bytes
    # the stated bound: the uploads in flight, each body held twice (parser + read) plus
    # its decoded uint8 and float32 copies, plus 64 MB for everything else
    decoded = 1500 * 1800 * 3 * (1 + 4 + 4)
    bound = limits.max_pending_uploads * (2 * len(noise) + decoded) + (64 << 20)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    async def burst(url):
        async with httpx.AsyncClient(
            base_url=url, timeout=60, limits=httpx.Limits(max_connections=40)
        ) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/search",
                        data={"text": "red"},
                        files={"image": ("n.png", noise, "image/png")},
                    )
                    for _ in range(40)
                )
            )

    with ServerThread(create_app(engine, limits), limits) as url:
        before = _rss_bytes()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        responses = asyncio.run(burst(url))
        stop.set()
        sampler.join()
    statuses = sorted({r.status_code for r in responses})
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.headers.get("retry-after") for r in refused)
    assert any(r.status_code == 200 for r in responses)
    assert peak[0] - before < bound, (peak[0] - before) / 1e6
