"""The GPU path of serving (skipped without CUDA): CUDA-graph query network equals eager,
fp16 device search equals the float32 CPU search, and a GPU engine answers like a CPU one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.runtime import open_runtime
from serve.engine import Query, QueryEngine
from serve.search import GallerySearch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graph_query_network_equals_eager(art_dir):
    from export.artifacts import load_artifacts

    arts = load_artifacts(art_dir)
    eager = open_runtime(arts, "torch", torch.device("cuda"), cuda_graphs=False)
    graphed = open_runtime(arts, "torch", torch.device("cuda"), cuda_graphs=True)
    side = arts.image_size
    gen = torch.Generator().manual_seed(0)
    for batch, length in [(1, 2), (3, 9), (17, 20), (64, 5)]:
        images = torch.randn((batch, 3, side, side), generator=gen).cuda()
        tokens = torch.randint(2, 10, (batch, length), generator=gen).cuda()
        lengths = torch.randint(1, length + 1, (batch,), generator=gen).cuda()
        want_repr = eager.encode_image(images)
        got_repr = graphed.encode_image(images)
        for name in want_repr:
            torch.testing.assert_close(got_repr[name], want_repr[name], atol=1e-4, rtol=1e-4)
        want, want_text = eager.compose_query(want_repr, tokens, lengths)
        got, got_text = graphed.compose_query(got_repr, tokens, lengths)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert got.shape == (batch, arts.embed_dim)
    captured = [key for key, graph in graphed._graphs.items() if graph is not None]
    assert ("image", None, 4) in captured and ("query", 32, 32) in captured


def test_device_search_equals_cpu_search():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((5000, 64)).astype(np.float32)
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float16)
    queries = torch.from_numpy(rng.standard_normal((7, 64)).astype(np.float32))
    queries = queries / queries.norm(dim=1, keepdim=True)
    exclude = [None, 5, None, None, 4999, None, 0]
    cpu_scores, cpu_rows = GallerySearch(gallery, "cpu").search(queries, 20, exclude)
    gpu = GallerySearch(gallery, "cuda")
    assert gpu.layout == "device-fp16" and gpu.gallery.dtype == torch.float16
    gpu_scores, gpu_rows = gpu.search(queries, 20, exclude)
    torch.testing.assert_close(gpu_rows, cpu_rows, atol=0, rtol=0)
    torch.testing.assert_close(gpu_scores, cpu_scores, atol=1e-5, rtol=0)


def test_gpu_engine_answers_like_the_cpu_engine(art_dir):
    cpu = QueryEngine(art_dir, backend="torch", device="cpu")
    gpu = QueryEngine(art_dir, backend="torch", device="cuda")
    gpu.warmup((1, 4))
    queries = [Query("make it color1", ref_id=cpu.index.ids[i]) for i in range(0, 40, 7)]
    queries += [
        Query(
            "add shape3 and make it color2 please",
            image=cpu.prepare_image(cpu.index.image_bytes(i)),
        )
        for i in (2, 9)
    ]
    for batch in ([queries[0]], queries[:3], queries, (queries * 10)[:64]):
        want = cpu.search(batch, k=10).hits
        got = gpu.search(batch, k=10).hits
        for a, b in zip(want, got):
            assert [h.id for h in a] == [h.id for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-4)
    cpu.close()
    gpu.close()
