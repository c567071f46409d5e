"""Every protocol's recalls on random score matrices equal a brute-force reference
written here as plain loops (sort the allowed gallery by score, look at the top k)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pipeline import protocols

N_GALLERY = 60


def rank_all(protocol, queries, ids, metas, scores, k, chunk=7):
    """The library path: plan, chunked masking + top-k, subset ranking, metrics."""
    plan = protocols.build_plan(protocol, queries, ids, metas)
    ranking, subset_ranking = [], []
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        block = torch.tensor(scores[rows], dtype=torch.float32)
        top_idx, _ = protocols.rank_scores(block.clone(), plan, rows, k)
        ranking.append(top_idx.numpy())
        if plan.subsets is not None:
            cands = protocols.subset_candidates(plan, rows)
            sub = protocols.rank_subset(block, cands).numpy()
            subset_ranking.append(np.pad(sub, ((0, 0), (0, 8 - sub.shape[1])), constant_values=-1))
    ranking = np.concatenate(ranking)
    subset_ranking = np.concatenate(subset_ranking) if subset_ranking else None
    return (
        protocols.compute_metrics(protocol, queries, ids, metas, ranking, subset_ranking),
        ranking,
        subset_ranking,
    )


def brute_ranked(q, scores_row, ids, metas, *, exclude_ref, allowed=None):
    order = []
    for j in range(len(ids)):
        if exclude_ref and ids[j] == q["ref_id"]:
            continue
        if allowed is not None and ids[j] not in allowed:
            continue
        order.append(j)
    order.sort(key=lambda j: -scores_row[j])
    return order


def brute_recall(hit_lists, k):
    return 100.0 * sum(1 for hits in hit_lists if any(hits[:k])) / len(hit_lists)


def random_scores(m, n, seed):
    return np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)


def make_gallery(label_fn, n=N_GALLERY, **extra):
    ids = [f"img{i:03d}" for i in range(n)]
    metas = [
        {"id": ids[i], "label": label_fn(i), **{k: f(i) for k, f in extra.items()}}
        for i in range(n)
    ]
    return ids, metas


def assert_same(metrics, expected):
    for key, value in expected.items():
        assert math.isclose(metrics[key], value, abs_tol=1e-9), (key, metrics[key], value)


@pytest.mark.parametrize("name", ["css", "fashion200k"])
def test_label_hit_protocols(name):
    rng = random.Random(1)
    ids, metas = make_gallery(lambda i: f"scene {i % 7}")
    queries = [
        {
            "qid": q,
            "ref_id": ids[rng.randrange(N_GALLERY)],
            "text": "t",
            "target_ids": [ids[rng.randrange(N_GALLERY)]],
        }
        for q in range(40)
    ]
    protocol = protocols.resolve_protocol({"name": name})
    scores = random_scores(len(queries), N_GALLERY, 2)
    metrics, _, _ = rank_all(protocol, queries, ids, metas, scores, max(protocol["ks"]))
    label = {m["id"]: m["label"] for m in metas}
    hit_lists = []
    for q, row in zip(queries, scores):
        order = brute_ranked(q, row, ids, metas, exclude_ref=True)
        hit_lists.append([label[ids[j]] == label[q["target_ids"][0]] for j in order])
    expected = {f"R@{k}": brute_recall(hit_lists, k) for k in protocol["ks"]}
    assert_same(metrics, expected)
    assert metrics["queries"] == 40
    assert metrics["score"] == pytest.approx(np.mean(list(expected.values())))
    assert protocol["ks"] == ([1, 5, 10, 50] if name == "css" else [1, 10, 50])


def test_reference_is_excluded_even_when_it_scores_best():
    ids, metas = make_gallery(lambda i: f"l{i}", n=5)
    queries = [{"qid": 0, "ref_id": ids[0], "text": "t", "target_ids": [ids[0]]}]
    scores = np.array([[9.0, 1.0, 0.5, 0.2, 0.1]], dtype=np.float32)
    protocol = protocols.resolve_protocol({"name": "css", "ks": [1, 4]})
    metrics, ranking, _ = rank_all(protocol, queries, ids, metas, scores, 5)
    assert ranking[0].tolist() == [1, 2, 3, 4, -1] and metrics["R@4"] == 0.0
    kept = protocols.resolve_protocol({"name": "css", "ks": [1]}, {"exclude_reference": False})
    assert rank_all(kept, queries, ids, metas, scores, 1)[0]["R@1"] == 100.0


def test_mitstates_composition_adjective_and_noun_recalls():
    adjs, nouns = ["ripe", "old", "sliced", "wet"], ["apple", "car", "tomato"]
    ids, metas = make_gallery(lambda i: f"{adjs[i % 4]} {nouns[(i // 4) % 3]}")
    rng = random.Random(3)
    queries = [
        {
            "qid": q,
            "ref_id": ids[rng.randrange(N_GALLERY)],
            "text": "x",
            "target_ids": [ids[rng.randrange(N_GALLERY)]],
        }
        for q in range(50)
    ]
    protocol = protocols.resolve_protocol({"name": "mitstates"})
    scores = random_scores(len(queries), N_GALLERY, 4)
    metrics, _, _ = rank_all(protocol, queries, ids, metas, scores, 10)
    label = {m["id"]: m["label"] for m in metas}
    full, adj, noun = [], [], []
    for q, row in zip(queries, scores):
        order = brute_ranked(q, row, ids, metas, exclude_ref=True)
        target = label[q["target_ids"][0]].split()
        results = [label[ids[j]].split() for j in order]
        full.append([r == target for r in results])
        adj.append([r[0] == target[0] for r in results])
        noun.append([r[1] == target[1] for r in results])
    expected = {}
    for k in (1, 5, 10):
        expected[f"R@{k}"] = brute_recall(full, k)
        expected[f"adj/R@{k}"] = brute_recall(adj, k)
        expected[f"noun/R@{k}"] = brute_recall(noun, k)
    assert_same(metrics, expected)
    assert expected["noun/R@5"] > expected["R@5"]  # the partial recalls are not trivial copies


def fashioniq_data():
    cats = ["dress", "shirt", "toptee"]
    ids, metas = make_gallery(lambda i: None, category=lambda i: cats[i % 3])
    rng = random.Random(5)
    queries = []
    for q in range(45):
        cat = cats[q % 3]
        members = [i for i in ids if metas[int(i[3:])]["category"] == cat]
        ref, tgt = rng.sample(members[:12], 2)
        queries.append(
            {
                "qid": q,
                "ref_id": ref,
                "target_ids": [tgt],
                "category": cat,
                "captions": [f"is red {q}", f"has sleeves {q}"],
                "text": f"is red {q} and has sleeves {q}",
            }
        )
    return cats, ids, metas, queries


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"gallery": "triplets"},
        {"caption_orders": 2},
        {"exclude_reference": False, "gallery": "triplets"},
    ],
)
def test_fashioniq_per_category_recalls(options):
    cats, ids, metas, raw_queries = fashioniq_data()
    protocol = protocols.resolve_protocol({"name": "fashioniq"}, options)
    queries = protocols.expand_queries(protocol, raw_queries)
    assert len(queries) == 45 * protocol["caption_orders"]
    scores = random_scores(len(queries), N_GALLERY, 6)
    metrics, _, _ = rank_all(protocol, queries, ids, metas, scores, 50)
    category = {m["id"]: m["category"] for m in metas}
    expected = {}
    for cat in cats:
        if protocol["gallery"] == "triplets":
            allowed = {
                i for q in queries if q["category"] == cat for i in [q["ref_id"], *q["target_ids"]]
            }
        else:
            allowed = {i for i in ids if category[i] == cat}
        hit_lists = []
        for q, row in zip(queries, scores):
            if q["category"] != cat:
                continue
            order = brute_ranked(
                q, row, ids, metas, exclude_ref=protocol["exclude_reference"], allowed=allowed
            )
            hit_lists.append([ids[j] in q["target_ids"] for j in order])
        for k in (10, 50):
            expected[f"{cat}/R@{k}"] = brute_recall(hit_lists, k)
    for k in (10, 50):
        expected[f"avg/R@{k}"] = sum(expected[f"{c}/R@{k}"] for c in cats) / 3
    assert_same(metrics, expected)
    assert "R@10" not in metrics
    assert metrics["score"] == pytest.approx((expected["avg/R@10"] + expected["avg/R@50"]) / 2)
    described = protocols.describe_protocol(protocol)
    assert f"gallery={protocol['gallery']}" in described
    assert f"caption_orders={protocol['caption_orders']}" in described


def test_fashioniq_caption_orders_swap_the_captions():
    protocol = protocols.resolve_protocol({"name": "fashioniq"}, {"caption_orders": 2})
    out = protocols.expand_queries(
        protocol, [{"qid": 1, "captions": ["a", "b"], "text": "a and b"}]
    )
    assert [q["text"] for q in out] == ["a and b", "b and a"]
    with pytest.raises(ValueError, match="captions"):
        protocols.expand_queries(protocol, [{"qid": 2, "text": "x"}])


def cirr_data():
    ids, metas = make_gallery(lambda i: None)
    rng = random.Random(7)
    queries = []
    for q in range(30):
        members = rng.sample(ids, 6)
        ref = members[0]
        target = [members[rng.randrange(1, 6)]] if q < 24 else []  # 6 test-server queries
        queries.append(
            {
                "qid": q,
                "pairid": 1000 + q,
                "ref_id": ref,
                "text": "t",
                "target_ids": target,
                "members": members,
            }
        )
    return ids, metas, queries


def test_cirr_recall_and_recall_subset():
    ids, metas, queries = cirr_data()
    protocol = protocols.resolve_protocol({"name": "cirr"})
    scores = random_scores(len(queries), N_GALLERY, 8)
    metrics, ranking, subset_ranking = rank_all(protocol, queries, ids, metas, scores, 50)
    full, subset = [], []
    for q, row in zip(queries, scores):
        if not q["target_ids"]:
            continue
        order = brute_ranked(q, row, ids, metas, exclude_ref=True)
        full.append([ids[j] in q["target_ids"] for j in order])
        members = [m for m in q["members"] if m != q["ref_id"]]
        members.sort(key=lambda m: -row[ids.index(m)])
        subset.append([m in q["target_ids"] for m in members])
    expected = {f"R@{k}": brute_recall(full, k) for k in (1, 5, 10, 50)}
    expected.update({f"Rsubset@{k}": brute_recall(subset, k) for k in (1, 2, 3)})
    assert_same(metrics, expected)
    assert metrics["queries"] == 24
    assert metrics["score"] == pytest.approx((expected["R@5"] + expected["Rsubset@1"]) / 2)

    recall, recall_subset = protocols.cirr_submissions(queries, ids, ranking, subset_ranking)
    assert recall["version"] == recall_subset["version"] == "rc2"
    assert (recall["metric"], recall_subset["metric"]) == ("recall", "recall_subset")
    q = queries[-1]
    top = recall[str(q["pairid"])]
    assert len(top) == 50 and q["ref_id"] not in top
    assert top == [ids[j] for j in brute_ranked(q, scores[-1], ids, metas, exclude_ref=True)[:50]]
    sub = recall_subset[str(q["pairid"])]
    assert len(sub) == 3 and set(sub) < set(q["members"]) and q["ref_id"] not in sub


def test_options_and_inputs_are_validated():
    with pytest.raises(ValueError, match="does not apply"):
        protocols.resolve_protocol({"name": "css"}, {"gallery": "triplets"})
    with pytest.raises(ValueError, match="expected one of"):
        protocols.resolve_protocol({"name": "fashioniq"}, {"caption_orders": 3})
    assert protocols.parse_option("caption_orders=2") == ("caption_orders", 2)
    assert protocols.parse_option("exclude_reference=false") == ("exclude_reference", False)
    ids, metas = make_gallery(lambda i: "x", n=3)
    with pytest.raises(ValueError, match="'missing' is not in the gallery"):
        protocols.build_plan(
            protocols.resolve_protocol({"name": "css"}),
            [{"qid": 9, "ref_id": "missing", "target_ids": []}],
            ids,
            metas,
        )


@pytest.mark.parametrize("hit", ["label", "id"])
def test_hit_matrix_equals_a_loop_over_every_result(hit):
    """The vectorised hits against the definition, on random rankings with -1 padding,
    several targets per query and gallery images without a label."""
    rng = np.random.default_rng(0)
    ids = [f"g{i}" for i in range(40)]
    metas = [{"id": g, **({"label": f"l{i % 7}"} if i % 9 else {})} for i, g in enumerate(ids)]
    queries = [
        {"qid": q, "ref_id": ids[q], "target_ids": list(rng.choice(ids, rng.integers(1, 4)))}
        for q in range(25)
    ]
    ranking = rng.integers(-1, len(ids), size=(25, 12))
    got = protocols.hit_matrix({"hit": hit}, queries, ids, metas, ranking)
    labels = [protocols.gallery_label(m) for m in metas]
    for i, q in enumerate(queries):
        targets = [ids.index(t) for t in q["target_ids"]]
        for j, row in enumerate(ranking[i]):
            if hit == "label":
                expected = row >= 0 and labels[row] in {labels[t] for t in targets}
            else:
                expected = row >= 0 and row in targets
            assert got[i, j] == expected, (i, j)
    assert protocols.hit_matrix({"hit": hit}, queries[:0], ids, metas, ranking[:0]).shape == (0, 12)
