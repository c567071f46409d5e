"""The HTTP service (serve.app) through FastAPI's TestClient: every endpoint and every
kind of bad input answered with a 4xx JSON error."""

from __future__ import annotations

import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_fixtures import GALLERY_SIZE, limit_threads, serving_artifacts

from serve.app import BODY_OVERHEAD_BYTES, STATIC_DIR, ServiceLimits, create_app
from serve.engine import QueryEngine

MAX_IMAGE_BYTES = 4096
LIMITS = ServiceLimits(max_image_bytes=MAX_IMAGE_BYTES, max_text_chars=80, max_k=20, max_sample=30)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    limit_threads()
    art_dir = serving_artifacts(tmp_path_factory.getbasetemp())[0]
    engine = QueryEngine(art_dir, backend="torch", device="cpu", max_image_pixels=100_000)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, LIMITS)) as client:
        yield client


def png(width: int, height: int, colour=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]


def test_search_by_gallery_id(client, engine):
    ref = engine.index.ids[4]
    response = client.post("/search", data={"ref_id": ref, "text": "make it color2", "k": "5"})
    assert response.status_code == 200, response.text
    body = response.json()
    want = engine.query("make it color2", ref_id=ref, k=5)
    assert [r["id"] for r in body["results"]] == [h.id for h in want]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in want], abs=1e-5)
    assert ref not in [r["id"] for r in body["results"]]
    assert body["reference"] == {"ref_id": ref, "image_url": f"/images/{ref}"}
    assert body["timing"]["batch_size"] >= 1 and body["timing"]["total_ms"] > 0
    # every result's image URL serves that gallery image's stored bytes
    first = body["results"][0]
    image = client.get(first["image_url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.content == engine.index.image_bytes(engine.index.row_of[first["id"]])


def test_search_by_upload(client, engine):
    upload = engine.index.image_bytes(9)
    response = client.post(
        "/search",
        data={"text": "add shape1", "k": "3"},
        files={"image": ("query.png", upload, "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["id"] for r in body["results"]] == [
        h.id for h in engine.query("add shape1", image=upload, k=3)
    ]
    assert body["reference"]["upload"] == {"filename": "query.png", "bytes": len(upload)}


def test_gallery_sample_healthz_demo_page_and_docs(client, engine):
    sample = client.get("/gallery/sample", params={"n": 12, "seed": 3}).json()
    ids = [item["id"] for item in sample["items"]]
    assert len(ids) == len(set(ids)) == 12 and set(ids) <= set(engine.index.ids)
    assert sample["gallery_size"] == GALLERY_SIZE
    assert all(
        item["image_url"] == f"/images/{item['id']}" and "caption" in item
        for item in sample["items"]
    )
    assert client.get("/gallery/sample", params={"n": 12, "seed": 3}).json() == sample
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["gallery_size"] == GALLERY_SIZE
    assert health["backend"] == "torch" and health["device"] == "cpu"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/search", "/images/{image_id}", "/gallery/sample", "/healthz"} <= set(schema["paths"])


def test_demo_page_loads_nothing_from_other_hosts():
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name


@pytest.mark.parametrize(
    "fields, files, status, code",
    [
        ({"ref_id": "gal_0001"}, None, 422, "empty_text"),
        ({"ref_id": "gal_0001", "text": "   "}, None, 422, "empty_text"),
        ({"ref_id": "gal_0001", "text": "x" * 81}, None, 422, "text_too_long"),
        ({"ref_id": "no_such_id", "text": "make it red"}, None, 404, "unknown_ref_id"),
        ({"ref_id": "../index/ids.json", "text": "make it red"}, None, 404, "unknown_ref_id"),
        ({"ref_id": "gal_0001", "text": "make it red", "k": "0"}, None, 422, "k_out_of_range"),
        ({"ref_id": "gal_0001", "text": "make it red", "k": "21"}, None, 422, "k_out_of_range"),
        ({"ref_id": "gal_0001", "text": "make it red", "k": "ten"}, None, 422, "invalid_request"),
        ({"text": "make it red"}, None, 422, "reference_required"),
        ({"ref_id": "gal_0001", "text": "make it red"}, "valid", 422, "reference_conflict"),
        ({"text": "make it red"}, b"not an image at all", 400, "invalid_image"),
        ({"text": "make it red"}, b"", 400, "invalid_image"),
        ({"text": "make it red"}, "truncated", 400, "invalid_image"),
        ({"text": "make it red"}, "too_many_pixels", 413, "image_too_large"),
        ({"text": "make it red"}, "too_many_bytes", 413, "image_too_large"),
    ],
)
def test_bad_search_inputs(client, engine, fields, files, status, code):
    uploads = {
        "valid": engine.index.image_bytes(0),
        "truncated": engine.index.image_bytes(0)[:60],
        "too_many_pixels": png(400, 400),  # 160k pixels > max_image_pixels
        "too_many_bytes": bytes(MAX_IMAGE_BYTES + 1),
    }
    data = uploads.get(files, files) if files is not None else None
    response = client.post(
        "/search",
        data=fields,
        files={"image": ("x.png", data, "image/png")} if data is not None else None,
    )
    assert_error(response, status, code)


def test_other_bad_requests(client):
    assert_error(
        client.post("/search", json={"ref_id": "gal_0001", "text": "red"}),
        415,
        "unsupported_media_type",
    )
    huge = bytes(MAX_IMAGE_BYTES + BODY_OVERHEAD_BYTES + 1000)
    assert_error(
        client.post(
            "/search", data={"text": "red"}, files={"image": ("big.png", huge, "image/png")}
        ),
        413,
        "request_too_large",
    )
    assert_error(client.get("/search"), 405, "method_not_allowed")
    assert_error(client.get("/gallery/sample", params={"n": 0}), 422, "invalid_request")
    assert_error(client.get("/gallery/sample", params={"n": 31}), 422, "invalid_request")
    assert_error(client.get("/no/such/page"), 404, "not_found")
    for path in (
        "/images/nope",
        "/images/..%2Fartifacts.json",
        "/images/../../etc/passwd",
        "/images/%2E%2E/index.json",
        "/static/../app.py",
    ):
        response = client.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["content-type"] == "application/json"


def test_chunked_upload_over_the_limit_is_cut_off(client):
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nred\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield bytes(4096)
        yield b"\r\n--b--\r\n"

    response = client.post(
        "/search", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert_error(response, 413, "request_too_large")
    assert client.get("/healthz").status_code == 200
