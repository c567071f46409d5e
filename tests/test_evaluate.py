"""Model evaluation end to end on tiny shards: recalls equal a brute-force reference
computed here with loops, CCNet Eq. 15 re-ranking, CIRR submissions and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from shard_fixtures import write_dataset
from torch import nn

from pipeline.checkpoint import save_checkpoint
from pipeline.evaluate import composition_logit_scale, evaluate_model, main, rerank_with_correction
from pipeline.gallery_data import iter_gallery_samples, read_gallery_bytes
from pipeline.images import ImagePreprocess, decode_image
from pipeline.models import ComposedRetrievalModel, create_model, list_models
from pipeline.shard_groups import build_vocabulary
from pipeline.vocab import Vocabulary

torch.set_num_threads(1)
SIZE = 32


class ColourModel(ComposedRetrievalModel):
    """Mean colour + spatial layout features, a bag-of-words text vector; small and exact."""

    def __init__(self, vocab_size: int, embed_dim: int = 8, correction: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed_dim = embed_dim
        self.image = nn.Linear(12, embed_dim)
        self.words = nn.Embedding(vocab_size, embed_dim)
        self.has_correction = correction
        self.loss_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images):
        pooled = F.adaptive_avg_pool2d(images, 2).flatten(1)  # (B, 12)
        return (pooled,)

    def encode_text(self, tokens, lengths):
        mask = (tokens > 0).float().unsqueeze(-1)
        return ((self.words(tokens) * mask).sum(1) / lengths.unsqueeze(1).float(),)

    def compose(self, image_repr, text_repr):
        return F.normalize(self.image(image_repr[0]) + text_repr[0], dim=-1)

    def embed_target(self, image_repr):
        return F.normalize(self.image(image_repr[0]), dim=-1)

    def correct(self, ref_repr, cand_repr, text_repr):
        # strong enough to reorder candidates: prefers candidates whose colour differs
        return 30.0 * (cand_repr[0] - ref_repr[0]).abs().mean(1) + text_repr[0][:, 0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("ev") / "ds", explicit_groups=3, gallery_size=16, query_count=12
    )


@pytest.fixture(scope="module")
def vocab(dataset):
    return build_vocabulary(dataset)


def brute_force_hits(model, vocab, dataset, rerank_top=0):
    """Per query the gallery ids in ranked order, by plain loops over every image."""
    queries = json.loads((dataset / "queries.json").read_text())
    gallery = read_gallery_bytes(dataset, "gallery")
    preprocess = ImagePreprocess(SIZE)
    ids = list(gallery)
    with torch.no_grad():
        feats = {
            i: model.encode_image(preprocess(decode_image(gallery[i][0])).unsqueeze(0)) for i in ids
        }
        targets = {i: model.embed_target(feats[i])[0] for i in ids}
        ranked = []
        for q in queries:
            tokens, lengths = vocab.encode([q["text"]])
            text = model.encode_text(tokens, lengths)
            query = model.compose(feats[q["ref_id"]], text)[0]
            scores = {i: float(query @ targets[i]) for i in ids if i != q["ref_id"]}
            order = sorted(scores, key=lambda i: -scores[i])
            if rerank_top:
                lam = float(model.loss_scale) ** 2
                lse = math.log(sum(math.exp(lam * s) for s in scores.values()))
                head = order[:rerank_top]
                corr = [float(model.correct(feats[q["ref_id"]], feats[i], text)) for i in head]
                corr_lse = math.log(sum(math.exp(c) for c in corr))
                total = {i: lam * scores[i] - lse + c - corr_lse for i, c in zip(head, corr)}
                order = sorted(head, key=lambda i: -total[i]) + order[rerank_top:]
            ranked.append(order)
    return queries, ranked


def brute_recalls(dataset, queries, ranked, ks):
    metas = {meta["id"]: meta for meta, _, _ in iter_gallery_samples(dataset, "gallery")}
    out = {}
    for k in ks:
        hits = sum(
            any(metas[i]["label"] == metas[q["target_ids"][0]]["label"] for i in order[:k])
            for q, order in zip(queries, ranked)
        )
        out[f"R@{k}"] = 100.0 * hits / len(queries)
    return out


def test_recalls_equal_brute_force(dataset, vocab):
    model = ColourModel(len(vocab)).eval()
    metrics = evaluate_model(model, vocab, dataset, image_size=SIZE, batch_size=5)
    queries, ranked = brute_force_hits(model, vocab, dataset)
    expected = brute_recalls(dataset, queries, ranked, [1, 5, 10, 50])
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["protocol"] == "css(ks=1,5,10,50, hit=label, exclude_reference=true)"
    assert metrics["queries"] == 12 and metrics["eval"] == "test"
    assert 0 < metrics["R@5"] < 100  # a ranking that tells models apart


def test_ccnet_reranking_follows_eq15(dataset, vocab):
    model = ColourModel(len(vocab), correction=True).eval()
    plain = evaluate_model(model, vocab, dataset, image_size=SIZE, batch_size=5, rerank_top=0)
    reranked = evaluate_model(model, vocab, dataset, image_size=SIZE, batch_size=5, rerank_top=6)
    queries, ranked = brute_force_hits(model, vocab, dataset, rerank_top=6)
    expected = brute_recalls(dataset, queries, ranked, [1, 5, 10, 50])
    for key, value in expected.items():
        assert reranked[key] == pytest.approx(value), key
    _, unranked = brute_force_hits(model, vocab, dataset)
    assert ranked != unranked  # the correction network changed some orders
    assert plain["R@10"] == pytest.approx(brute_recalls(dataset, queries, unranked, [10])["R@10"])


def test_rerank_with_correction_orders_by_both_softmaxes():
    model = ColourModel(5, correction=True)
    gallery = (torch.tensor([[0.0] * 12, [1.0] * 12, [0.1] * 12, [0.5] * 12]),)
    ref, text = (torch.zeros(1, 12),), (torch.zeros(1, 8),)
    candidates = torch.tensor([[0, 2, 3, -1]])
    scores = torch.tensor([[0.9, 0.8, 0.1, float("-inf")]])
    order, total = rerank_with_correction(
        model,
        ref_repr=ref,
        text_repr=text,
        gallery_repr=gallery,
        candidates=candidates,
        candidate_scores=scores,
        logit_scale=1.0,
    )
    corr = 30.0 * torch.tensor([0.0, 0.1, 0.5])
    expected = torch.log_softmax(scores[0, :3], 0) + torch.log_softmax(corr, 0)
    best = expected.argsort(descending=True)
    assert order[0].tolist() == candidates[0, best].tolist() + [-1]
    assert torch.allclose(total[0, :3], expected[best], atol=1e-5)
    assert order[0, 0] == 3  # the correction overturned the composition order
    assert composition_logit_scale(model) == pytest.approx(4.0)


def test_cirr_submission_files(tmp_path, vocab):
    queries = [
        {
            "qid": q,
            "pairid": 500 + q,
            "ref_id": f"gal_{q:04d}",
            "text": "make it color1",
            "target_ids": [f"gal_{q + 1:04d}"] if q < 3 else [],
            "members": [f"gal_{(q + j) % 8:04d}" for j in range(5)],
        }
        for q in range(5)
    ]
    data = write_dataset(
        tmp_path / "cirr",
        explicit_groups=1,
        gallery_size=8,
        protocol={"name": "cirr"},
        queries=queries,
    )
    model = ColourModel(len(vocab)).eval()
    metrics = evaluate_model(
        model, vocab, data, image_size=SIZE, batch_size=2, submission_dir=tmp_path / "submit"
    )
    assert {"R@1", "R@50", "Rsubset@1", "Rsubset@3"} <= metrics.keys() and metrics["queries"] == 3
    recall = json.loads((tmp_path / "submit" / "test-recall.json").read_text())
    subset = json.loads((tmp_path / "submit" / "test-recall_subset.json").read_text())
    assert recall["metric"] == "recall" and subset["metric"] == "recall_subset"
    assert set(recall) - {"version", "metric"} == {str(500 + q) for q in range(5)}
    assert len(recall["504"]) == 7 and "gal_0004" not in recall["504"]  # 8 images - reference
    assert len(subset["504"]) == 3 and set(subset["504"]) <= set(queries[4]["members"][1:])


def cli_model(vocab: Vocabulary):
    if "concat" in list_models():
        return create_model("concat", vocab_size=len(vocab), embed_dim=32)
    return ColourModel(len(vocab))


def test_cli_on_a_checkpoint(tmp_path, dataset, vocab, capsys):
    model = cli_model(vocab)
    config = {
        "image": {"size": SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "eval": {"rerank_top": 10},
    }
    save_checkpoint(tmp_path / "ckpt", model, vocab, config, step=7)
    out_json, grid = tmp_path / "m.json", tmp_path / "grid.png"
    main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--data",
            str(dataset),
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--json-out",
            str(out_json),
            "--grid",
            str(grid),
        ]
    )
    printed = capsys.readouterr().out
    assert "protocol: css(ks=1,5,10,50, hit=label, exclude_reference=true)" in printed
    assert "R@10" in printed
    saved = json.loads(out_json.read_text())
    direct = evaluate_model(model.eval(), vocab, dataset, image_size=SIZE, batch_size=8)
    for key in ("R@1", "R@5", "R@10", "R@50"):
        assert saved[key] == pytest.approx(direct[key])
    assert saved["step"] == 7
    assert grid.stat().st_size > 1000 and grid.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="does not apply to 'css'"):
        main(
            [
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--data",
                str(dataset),
                "--device",
                "cpu",
                "--protocol-option",
                "gallery=triplets",
            ]
        )


def test_unknown_protocol_option_is_rejected(dataset, vocab):
    with pytest.raises(ValueError, match="does not apply to 'css'"):
        evaluate_model(
            ColourModel(len(vocab)),
            vocab,
            dataset,
            image_size=SIZE,
            protocol_options={"caption_orders": 2},
        )
