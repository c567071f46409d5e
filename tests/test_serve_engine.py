"""QueryEngine over a real exported artifact directory: brute-force equality, backend
parity (torch vs onnxruntime on the CPU), batching, input errors."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from serve_fixtures import serving_artifacts

from pipeline.checkpoint import load_model
from pipeline.images import ImagePreprocess, decode_image
from serve.engine import (
    ImageTooLargeError,
    InvalidImageError,
    Query,
    QueryEngine,
    QueryError,
    UnknownReferenceError,
)
from serve.gallery import GalleryIndexError


@pytest.fixture(scope="module")
def ort_engine(art_dir):
    engine = QueryEngine(
        art_dir, backend="onnxruntime", device="cpu", backend_options={"threads": 1}
    )
    yield engine
    engine.close()


def brute_force(art_dir, engine, text, k, image=None, ref_row=None):
    """Independent answer: eager model on freshly decoded pixels, numpy dot products
    over every gallery embedding, reference excluded, ties to the lower row."""
    model, vocab, _ = load_model(art_dir / "checkpoint.pt")
    size = engine.artifacts.image_size
    data = image if image is not None else engine.index.image_bytes(ref_row)
    pixels = ImagePreprocess(size)(decode_image(data)).unsqueeze(0)
    tokens, lengths = vocab.encode([text], max_len=engine.max_text_len)
    with torch.inference_mode():
        query = model.compose(model.encode_image(pixels), model.encode_text(tokens, lengths))
    gallery = np.load(art_dir / "index" / "embeddings.npy").astype(np.float32)
    scores = gallery @ query[0].numpy()
    order = [r for r in sorted(range(len(scores)), key=lambda r: (-scores[r], r)) if r != ref_row]
    return [engine.index.ids[r] for r in order[:k]], scores[order[:k]]


def test_engine_equals_brute_force(art_dir, engine):
    upload = engine.index.image_bytes(7)
    hits = engine.query("make it color3", image=upload, k=8)
    want_ids, want_scores = brute_force(art_dir, engine, "make it color3", 8, image=upload)
    assert [h.id for h in hits] == want_ids
    np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)
    # a gallery reference uses the stored representation: same ranking, itself excluded
    ref_id = engine.index.ids[7]
    hits = engine.query("make it color3", ref_id=ref_id, k=8)
    want_ids, want_scores = brute_force(art_dir, engine, "make it color3", 8, ref_row=7)
    assert ref_id not in [h.id for h in hits]
    assert [h.id for h in hits] == want_ids
    np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-3)  # fp16 repr
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_torch_and_onnxruntime_backends_agree(engine, ort_engine):
    queries = [Query("make it color1", ref_id=engine.index.ids[i]) for i in (0, 5, 11)]
    queries += [
        Query("add shape2", image=engine.prepare_image(engine.index.image_bytes(i)))
        for i in (3, 20)
    ]
    a = engine.search(queries, k=10).hits
    b = ort_engine.search(queries, k=10).hits
    for hits_a, hits_b in zip(a, b):
        assert [h.id for h in hits_a] == [h.id for h in hits_b]
        np.testing.assert_allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-4)


def test_batch_answers_equal_single_answers(engine):
    queries = [
        Query("make it color0", ref_id=engine.index.ids[2]),
        Query("put shape4", image=engine.prepare_image(engine.index.image_bytes(9))),
        Query("turn it color2", ref_id=engine.index.ids[30]),
    ]
    batch = engine.search(queries, k=5)
    assert set(batch.timing_ms) >= {"encode_ms", "search_ms", "engine_ms"}
    for query, hits in zip(queries, batch.hits):
        single = engine.search([query], k=5).hits[0]
        assert [h.id for h in hits] == [h.id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)


def test_text_padding_leaves_the_query_unchanged(engine):
    """The premise of the GPU path's text-length buckets: pad tokens after a text's end
    do not change its query embedding."""
    tokens, lengths = engine.vocab.encode(["make it color1", "add shape2 to it"])
    image_repr = engine.backend.encode_image(
        torch.stack([engine.prepare_image(engine.index.image_bytes(i)) for i in (0, 1)])
    )
    query, _ = engine.backend.compose_query(image_repr, tokens, lengths)
    padded = torch.nn.functional.pad(tokens, (0, 32 - tokens.shape[1]))
    query_padded, _ = engine.backend.compose_query(image_repr, padded, lengths)
    torch.testing.assert_close(query_padded, query, atol=1e-6, rtol=1e-5)


def test_bucket_and_batch_padding_helpers():
    from export.runtime.cuda_graphs import BATCH_BUCKETS, bucket, pad_batch

    assert [bucket(n, BATCH_BUCKETS) for n in (1, 3, 4, 33, 64, 65)] == [1, 4, 4, 64, 64, None]
    x = torch.arange(6.0).view(3, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[3], x[0]) and torch.equal(padded[:3], x)


def test_chunked_search_over_the_memory_map_gives_the_same_answers(art_dir, engine):
    chunked = QueryEngine(
        art_dir, backend="torch", device="cpu", chunk_rows=6, max_resident_bytes=0
    )
    assert chunked.gallery.layout == "chunked-mmap-fp32"
    for ref in (1, 17):
        want = engine.query("make it color4", ref_id=engine.index.ids[ref], k=12)
        got = chunked.query("make it color4", ref_id=engine.index.ids[ref], k=12)
        assert [h.id for h in got] == [h.id for h in want]
    chunked.close()


def test_gallery_index_is_memory_mapped(engine):
    assert isinstance(engine.index.embeddings, np.memmap)
    assert all(isinstance(r, np.memmap) for r in engine.index.reprs.values())


def test_bad_inputs_raise_query_errors(art_dir, engine):
    with pytest.raises(UnknownReferenceError, match="not in the gallery index"):
        engine.query("make it red", ref_id="../../etc/passwd")
    with pytest.raises(InvalidImageError, match="not an image"):
        engine.prepare_image(b"definitely not an image")
    with pytest.raises(InvalidImageError, match="empty"):
        engine.prepare_image(b"")
    png = engine.index.image_bytes(0)
    with pytest.raises(InvalidImageError):
        engine.prepare_image(png[: len(png) // 2])  # truncated
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    small = QueryEngine(art_dir, backend="torch", device="cpu", max_image_pixels=50_000)
    with pytest.raises(ImageTooLargeError, match="300x300"):
        small.prepare_image(buf.getvalue())
    small.close()
    with pytest.raises(QueryError, match="exactly one reference"):
        engine.search([Query("x")])
    with pytest.raises(QueryError, match="k must be a positive int"):
        engine.search([Query("x", ref_id=engine.index.ids[0])], k=0)
    # other image formats decode through Pillow
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="BMP")
    assert engine.prepare_image(buf.getvalue()).shape == (3, 32, 32)


def test_unfinished_or_mismatched_index_is_refused(art_dir, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(art_dir / "index", index)
    info = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(GalleryIndexError, match="has not finished"):
        QueryEngine(art_dir, device="cpu", index_dir=index)
    (index / "index.json").write_text(json.dumps({**info, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(GalleryIndexError, match="rebuild the index"):
        QueryEngine(art_dir, device="cpu", index_dir=index)


def test_ccnet_reranks_like_the_evaluation(tmp_path_factory):
    """CCNet: the engine's re-rank over gathered candidates equals evaluation's
    rerank_with_correction over the whole stored gallery, on both backends."""
    from pipeline.evaluate import composition_logit_scale, rerank_with_correction

    art_dir = serving_artifacts(tmp_path_factory.getbasetemp(), "ccnet")[0]
    torch_engine = QueryEngine(art_dir, backend="torch", device="cpu", rerank_top=10)
    ort_engine = QueryEngine(
        art_dir, backend="onnxruntime", device="cpu", rerank_top=10, backend_options={"threads": 1}
    )
    assert torch_engine.has_correction and torch_engine.rerank_top == 10
    model = torch_engine.backend.model
    names = torch_engine.artifacts.image_repr_names
    gallery_repr = tuple(
        torch.from_numpy(np.asarray(torch_engine.index.reprs[n], np.float32)) for n in names
    )
    targets = torch.from_numpy(np.asarray(torch_engine.index.embeddings, np.float32))
    ref_rows = [2, 13, 31]
    texts = ["make it color1", "add shape3", "turn it color4"]
    tokens, lengths = torch_engine.vocab.encode(texts)
    with torch.inference_mode():
        ref_repr = tuple(r[ref_rows] for r in gallery_repr)
        text_repr = model.encode_text(tokens, lengths)
        scores = model.compose(ref_repr, text_repr) @ targets.T
        scores[torch.arange(3), torch.tensor(ref_rows)] = -torch.inf  # reference excluded
        top_scores, top_rows = torch.topk(scores, 10, dim=1)
    want_rows, want_scores = rerank_with_correction(
        model,
        ref_repr=ref_repr,
        text_repr=text_repr,
        gallery_repr=gallery_repr,
        candidates=top_rows,
        candidate_scores=top_scores,
        logit_scale=composition_logit_scale(model),
    )
    queries = [Query(t, ref_id=torch_engine.index.ids[r]) for t, r in zip(texts, ref_rows)]
    for engine in (torch_engine, ort_engine):
        hits = engine.search(queries, k=6).hits
        for b in range(3):
            assert [h.id for h in hits[b]] == [engine.index.ids[r] for r in want_rows[b, :6]]
            np.testing.assert_allclose(
                [h.score for h in hits[b]], want_scores[b, :6].numpy(), atol=1e-4
            )
        engine.close()


def test_a_failed_graph_capture_leaves_later_buckets_eager(monkeypatch):
    """One failed capture: that bucket and every later one run eagerly (no further
    capture into the shared pool), and query graphs are captured with cuDNN off."""
    from export.runtime import cuda_graphs, torch_model

    calls = []

    def fake_capture(fn, inputs, pool, key, cudnn=True):
        calls.append((key, cudnn))
        return None  # as when the capture is invalidated

    monkeypatch.setattr(cuda_graphs.CapturedGraph, "try_capture", staticmethod(fake_capture))
    backend = object.__new__(torch_model.TorchModel)  # the graph bookkeeping alone, on a CPU
    backend.cuda_graphs, backend._graphs, backend._pool = True, {}, None

    def double(x):
        return (2 * x,)

    x = torch.arange(6.0).view(3, 2)
    (out,) = backend._run(("query", 8), double, [x])
    torch.testing.assert_close(out, 2 * x)
    (out,) = backend._run(("image", None), double, [x[:1]])
    torch.testing.assert_close(out, 2 * x[:1])
    assert calls == [(("query", 8, 4), False)]  # the image bucket was not captured
    assert backend._graphs == {("query", 8, 4): None, ("image", None, 1): None}
