"""The service under a real uvicorn server on a free loopback port: a bounded load test,
a flood of bad requests, and the demo page driven by headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import httpx
import numpy as np
import pytest
from serve_fixtures import ServerThread

from serve.app import ServiceLimits, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def base_url(engine):
    limits = ServiceLimits(max_image_bytes=64 * 1024)
    with ServerThread(create_app(engine, limits), limits) as url:
        yield url


async def _drive(base_url: str, requests: list[dict], concurrency: int, timeout_s: float):
    """Send ``requests`` (kwargs of httpx's post) from ``concurrency`` clients; returns
    (status codes, latencies in seconds, wall seconds)."""
    statuses: list[int] = [0] * len(requests)
    latencies: list[float] = [0.0] * len(requests)
    cursor = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def worker():
            for i in cursor:
                began = time.perf_counter()
                response = await client.post("/search", **requests[i])
                latencies[i] = time.perf_counter() - began
                statuses[i] = response.status_code

        began = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
        return statuses, latencies, time.perf_counter() - began


def test_load_200_requests_from_8_clients(base_url, engine, record_property):
    upload = engine.index.image_bytes(3)
    requests = []
    for i in range(200):
        if i % 4 == 3:
            requests.append(
                {
                    "data": {"text": f"add shape{i % 7}", "k": "10"},
                    "files": {"image": ("ref.png", upload, "image/png")},
                }
            )
        else:
            requests.append(
                {
                    "data": {
                        "ref_id": engine.index.ids[i % len(engine.index)],
                        "text": f"make it color{i % 5}",
                        "k": "10",
                    }
                }
            )
    statuses, latencies, wall = asyncio.run(_drive(base_url, requests, 8, timeout_s=60))
    assert statuses == [200] * 200, {s: statuses.count(s) for s in set(statuses)}
    report = {
        "requests": 200,
        "concurrency": 8,
        "requests_per_s": round(200 / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
    }
    record_property("serve_load", json.dumps(report))
    print("serve load test:", json.dumps(report))
    health = httpx.get(f"{base_url}/healthz").json()
    assert health["queries"] >= 200 and health["batches"] <= health["queries"]


def test_flood_of_bad_requests_leaves_the_service_serving(base_url, engine):
    bad = [
        {"data": {"text": "red"}, "files": {"image": ("x.png", b"garbage" * 10, "image/png")}},
        {"data": {"ref_id": "missing", "text": "red"}},
        {"data": {"ref_id": engine.index.ids[0], "text": ""}},
        {"data": {"ref_id": engine.index.ids[0], "text": "red", "k": "-3"}},
        {"data": {"text": "red"}},
        {
            "content": b"\x00\x01 not multipart",
            "headers": {"content-type": "multipart/form-data; boundary=zz"},
        },
        {"data": {"text": "red"}, "files": {"image": ("x.png", bytes(70 * 1024), "image/png")}},
        {"json": {"text": "red"}},
    ]
    statuses, _, _ = asyncio.run(_drive(base_url, bad * 25, 8, timeout_s=60))
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    response = httpx.post(f"{base_url}/search", data={"ref_id": engine.index.ids[1], "text": "red"})
    assert response.status_code == 200 and len(response.json()["results"]) == 10
    assert httpx.get(f"{base_url}/healthz").json()["status"] == "ok"


def test_demo_page_in_headless_chromium(base_url):
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(
            f"no Chromium at {CHROMIUM} (apt-get install chromium; CI runs .ci/install-browser)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            outside = []
            page.on(
                "request", lambda r: None if r.url.startswith(base_url) else outside.append(r.url)
            )
            page.goto(base_url + "/", timeout=20_000)
            page.wait_for_selector("#samples figure img", timeout=20_000)
            assert page.locator("#samples figure").count() == 12
            page.locator("#samples figure").nth(2).click()
            chosen = page.locator("#samples figure.chosen").get_attribute("data-id")
            page.fill("#text", "make it color1")
            page.fill("#k", "6")
            page.click("#search")
            page.wait_for_selector("#results figure.result img", timeout=20_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every("
                "i => i.complete && i.naturalWidth > 0)",
                timeout=20_000,
            )
            results = page.locator("#results figure.result img")
            assert results.count() == 6
            shown = [results.nth(i).get_attribute("alt") for i in range(6)]
            assert chosen not in shown  # the reference is not its own answer
            assert page.locator("#error").is_hidden()
            assert outside == []
        finally:
            browser.close()
