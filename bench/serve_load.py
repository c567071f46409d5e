"""Bounded loopback load test of ``python -m serve``: valid queries mixed with every
hostile input the service must refuse, slow and vanishing clients, and a burst of large
uploads.

    python -m bench.serve_load [--artifacts ART_DIR] [--requests 600] [--clients 16]
        [--seconds 120] [--burst 40] [--backend onnxruntime] [--json-out FILE]

Without ``--artifacts`` it builds one in a temporary directory: the small CSS-style
dataset (``shards.css --small``), a random-weight TIRG at 64 px exported with
``export.onnx`` and its gallery index. The service runs as its own process on a free
127.0.0.1 port (so its resident memory is its own) and is stopped at the end; every
request loop is bounded in count and in time.

Valid requests that get 503 with ``Retry-After`` (overload, by design) are retried after
it; a valid request is lost when it never gets a 200. Printed and written as JSON:
requests by kind, status codes, p50/p99 latency of valid requests, the server's
resident memory at the start, its peak and after the burst, 5xx other than overload
503s, and lost valid requests. Goals: no 5xx, nothing lost, memory back within 10 % of
its start.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

log = logging.getLogger("bench.serve_load")
REPO = Path(__file__).resolve().parents[1]


# -- what is sent ------------------------------------------------------------------------------
def _png(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG with exactly this IHDR (whatever size it claims) and ``rows`` as its IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _png16(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of a uint8 (H, W, 3) picture (samples x 257: the same picture)."""
    height, width = rgb.shape[:2]
    samples = (rgb.astype(">u2") * 257).reshape(height, -1)
    return _raw_png(width, height, 16, 2, b"".join(b"\x00" + row.tobytes() for row in samples))


def request_mix(ids: list[str], upload: bytes) -> list[tuple[str, bool, dict]]:
    """(kind, valid, httpx post kwargs) of every kind of request the load sends."""
    rgb = np.asarray(Image.open(io.BytesIO(upload)).convert("RGB"))
    image = Image.fromarray(rgb)

    def file(data: bytes, name="ref.png", kind="image/png") -> dict:
        return {"image": (name, data, kind)}

    # the IHDR of a 1 x 40,000,000 RGB image, no pixel data worth decoding
    header_only = _raw_png(1, 40_000_000, 8, 2, b"\0" * 64)
    ref = random.Random(0).choice
    return [
        ("valid_ref_id", True, {"data": {"ref_id": ref(ids), "text": "make it red", "k": "10"}}),
        ("valid_upload", True, {"data": {"text": "add a circle"}, "files": file(upload)}),
        ("valid_16bit_png", True, {"data": {"text": "red"}, "files": file(_png16(rgb))}),
        (
            "valid_palette_png",
            True,
            {"data": {"text": "red"}, "files": file(_png(image.convert("P")))},
        ),
        (
            "valid_cmyk_jpeg",
            True,
            {
                "data": {"text": "red"},
                "files": file(_png(image.convert("CMYK"), "JPEG"), "r.jpg", "image/jpeg"),
            },
        ),
        (
            "aspect_50000x2",
            False,
            {"data": {"text": "red"}, "files": file(_png(Image.new("RGB", (50000, 2))))},
        ),
        ("header_1x40M", False, {"data": {"text": "red"}, "files": file(header_only)}),
        (
            "truncated_png",
            False,
            {"data": {"text": "red"}, "files": file(upload[: len(upload) // 2])},
        ),
        (
            "not_an_image",
            False,
            {"data": {"text": "red"}, "files": file(b"GIF89a not really" * 20)},
        ),
        ("text_too_long", False, {"data": {"ref_id": ids[0], "text": "x" * 5000}}),
        ("bad_k", False, {"data": {"ref_id": ids[0], "text": "red", "k": "-4"}}),
        ("path_id", False, {"data": {"ref_id": "../../etc/passwd", "text": "red"}}),
        ("wrong_content_type", False, {"json": {"ref_id": ids[0], "text": "red"}}),
        ("empty_text", False, {"data": {"ref_id": ids[0], "text": "  "}}),
    ]


# -- the server --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """``python -m serve`` in a child process on a free loopback port."""

    def __init__(self, art_dir: Path, backend: str, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "serve", "--artifacts", str(art_dir), "--device", "cpu"]
        command += ["--backend", backend, "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command + extra, cwd=REPO, env={**os.environ})

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.process.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the service did not answer within {timeout} s")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


class PeakSampler(threading.Thread):
    """Samples the service's resident memory every 10 ms; ``peak`` is the largest seen."""

    def __init__(self, service: Service):
        super().__init__(daemon=True)
        self.service, self.peak, self.halt = service, 0, threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.peak = max(self.peak, self.service.rss_bytes())
            except OSError:
                return
            time.sleep(0.01)


# -- the load ----------------------------------------------------------------------------------
async def send_all(url, jobs, clients: int, deadline: float, retries: int = 20):
    """Post every job from ``clients`` concurrent clients; valid jobs are retried after a
    503's Retry-After. Returns [(kind, valid, final status, latency s, tries)]."""
    results = []
    queue = list(jobs)
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker():
            while queue and time.monotonic() < deadline:
                kind, valid, kwargs = queue.pop()
                began, tries, status = time.perf_counter(), 0, 0
                while tries <= retries and time.monotonic() < deadline:
                    tries += 1
                    try:
                        response = await client.post("/search", **kwargs)
                        status = response.status_code
                    except httpx.HTTPError as err:
                        status = f"client error: {type(err).__name__}"
                        break
                    if status == 503 and valid:
                        await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                        continue
                    break
                results.append((kind, valid, status, time.perf_counter() - began, tries))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def slow_clients(url: str, count: int) -> list[socket.socket]:
    """Idle sockets, stalled heads and stalled bodies, left open for the server to close."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for i in range(count):
        sock = socket.create_connection((host, int(port)))
        if i % 3 == 1:
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-")
        elif i % 3 == 2:
            sock.sendall(
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                b"boundary=zz\r\nContent-Length: 4000\r\n\r\n--zz\r\n"
            )
        socks.append(sock)
    return socks


def vanishing_clients(url: str, ids: list[str], count: int) -> None:
    """Clients that send a whole query and hang up 20 ms later."""
    host, port = url.removeprefix("http://").split(":")
    for i in range(count):
        body = f"ref_id={ids[i % len(ids)]}&text=red".encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/x-www-form-urlencoded\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            time.sleep(0.02)


def closed_count(socks: list[socket.socket], wait: float) -> int:
    closed = 0
    for sock in socks:
        sock.settimeout(wait)
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except TimeoutError:
            pass
        except OSError:
            closed += 1
        finally:
            sock.close()
    return closed


def build_artifacts(out: Path) -> Path:
    """Small CSS data, a random-weight TIRG at 64 px exported, and its gallery index."""
    from bench.random_model import random_artifacts
    from export.index import build_index
    from shards.css import SMALL, CssConfig, generate_css

    data = out / "css-small"
    generate_css(data, CssConfig(**{**SMALL, "image_size": 64}), workers=2, preset="small")
    art_dir = random_artifacts(out, "tirg", 64, 512)
    build_index(art_dir, data, show_progress=False)
    return art_dir


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        art_dir = Path(args.artifacts) if args.artifacts else build_artifacts(Path(tmp))
        ids = json.loads((art_dir / "index" / "ids.json").read_text())
        service = Service(
            art_dir, args.backend, ["--body-timeout-s", "2", "--header-timeout-s", "2"]
        )
        try:
            service.wait_ready()
            return load(service, ids, args)
        finally:
            service.stop()


def load(service: Service, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    upload = httpx.get(f"{service.url}/images/{ids[0]}").content
    mix = request_mix(ids, upload)
    rng = random.Random(1)
    jobs = [mix[0] if i % 2 == 0 else rng.choice(mix) for i in range(args.requests)]
    deadline = time.monotonic() + args.seconds
    asyncio.run(send_all(service.url, [mix[0]] * 20, 4, deadline))  # warm up
    rss_start = service.rss_bytes()
    sampler = PeakSampler(service)
    sampler.start()
    slow = slow_clients(service.url, 60)
    vanish = threading.Thread(target=vanishing_clients, args=(service.url, ids, 50))
    vanish.start()
    began = time.perf_counter()
    results = asyncio.run(send_all(service.url, jobs, args.clients, deadline))
    big = np.random.default_rng(0).integers(0, 256, (1700, 1700, 3), dtype=np.uint8)
    big_png = _png(Image.fromarray(big), compress_level=1)  # ~8.7 MB of noise
    burst = [
        (
            "large_upload",
            True,
            {"data": {"text": "red"}, "files": {"image": ("b.png", big_png, "image/png")}},
        )
    ]
    results += asyncio.run(send_all(service.url, burst * args.burst, args.burst, deadline))
    wall = time.perf_counter() - began
    vanish.join()
    closed = closed_count(slow, wait=5.0)
    time.sleep(1.0)
    rss_end = service.rss_bytes()
    sampler.halt.set()
    sampler.join()
    health = httpx.get(f"{service.url}/healthz").json()
    valid = [r for r in results if r[1]]
    latencies = [r[3] for r in valid if r[2] == 200 and r[0] != "large_upload"]
    burst_latencies = [r[3] for r in valid if r[2] == 200 and r[0] == "large_upload"]
    statuses = Counter(str(r[2]) for r in results)
    return {
        "machine": f"{platform.node() or 'host'} ({os.cpu_count()} cores, {platform.machine()})",
        "backend": args.backend,
        "requests": len(results),
        "valid_requests": len(valid),
        "wall_s": round(wall, 2),
        "by_kind": {
            kind: dict(Counter(str(r[2]) for r in results if r[0] == kind))
            for kind in sorted({r[0] for r in results})
        },
        "status_codes": dict(sorted(statuses.items())),
        "retried_valid": sum(r[4] > 1 for r in valid),
        "lost_valid": sum(r[2] != 200 for r in valid),
        "server_errors_5xx": sum(
            1 for r in results if isinstance(r[2], int) and r[2] >= 500 and r[2] != 503
        ),
        "overload_503_final": sum(1 for r in results if r[2] == 503),
        "client_errors": sum(1 for r in results if isinstance(r[2], str)),
        "p50_ms": _percentile_ms(latencies, 50),
        "p99_ms": _percentile_ms(latencies, 99),
        "burst_p50_ms": _percentile_ms(burst_latencies, 50),
        "burst_p99_ms": _percentile_ms(burst_latencies, 99),
        "slow_sockets_closed": f"{closed}/{len(slow)}",
        "vanished_clients": 50,
        "dropped_queries": health.get("dropped_queries"),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_peak_mb": round(sampler.peak / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_end_vs_start": round(rss_end / rss_start, 3),
    }


def _percentile_ms(seconds: list[float], q: float) -> float | None:
    return round(float(np.percentile(seconds, q)) * 1e3, 2) if seconds else None


def print_report(report: dict[str, Any]) -> None:
    print(f"serve load on {report['machine']}, backend {report['backend']}")
    print("| kind | status codes |\n|---|---|")
    for kind, codes in report["by_kind"].items():
        print(f"| {kind} | {', '.join(f'{c} x{n}' for c, n in sorted(codes.items()))} |")
    rows = [
        ("requests", report["requests"]),
        (
            "valid / lost / retried",
            f"{report['valid_requests']} / {report['lost_valid']} / {report['retried_valid']}",
        ),
        ("5xx other than overload 503", report["server_errors_5xx"]),
        ("overload 503 as the last answer", report["overload_503_final"]),
        ("valid p50 / p99 ms (mixed load)", f"{report['p50_ms']} / {report['p99_ms']}"),
        (
            "large uploads p50 / p99 ms (burst, with retries)",
            f"{report['burst_p50_ms']} / {report['burst_p99_ms']}",
        ),
        ("slow sockets closed", report["slow_sockets_closed"]),
        (
            "vanished clients / queries dropped",
            f"{report['vanished_clients']} / {report['dropped_queries']}",
        ),
        (
            "RSS start / peak / end MB",
            f"{report['rss_start_mb']} / {report['rss_peak_mb']} / {report['rss_end_mb']}",
        ),
        ("RSS end / start", report["rss_end_vs_start"]),
        ("wall s", report["wall_s"]),
    ]
    print("\n| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--artifacts", default=None, help="ART_DIR with index/ (default: build one)"
    )
    parser.add_argument("--backend", default="onnxruntime", choices=("torch", "onnxruntime"))
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--burst", type=int, default=40, help="concurrent ~8.7 MB uploads")
    parser.add_argument("--seconds", type=float, default=120, help="hard bound on the load")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args)
    print_report(report)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    ok = report["server_errors_5xx"] == 0 and report["lost_valid"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
