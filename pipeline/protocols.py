"""Evaluation protocols of the five datasets, as pure functions on scores and rankings.

The manifest's ``protocol`` dict (``shards.manifest``) says which gallery images a query
may retrieve, which count as hits and which K's are reported. ``resolve_protocol``
fills in each dataset's defaults and applies named options; ``build_plan`` turns it
into index arrays; ``rank_scores`` ranks one chunk of a (queries x gallery) score
matrix under the plan; ``compute_metrics`` turns the rankings into recalls (percent).

* ``css`` (TIRG): R@1/5/10/50 over the test gallery, reference excluded, a result hits
  when its label (the scene description) equals the target's.
* ``fashion200k`` (TIRG): R@1/10/50; a result hits when its caption (label) equals the
  target caption; reference excluded.
* ``mitstates`` (TIRG): R@1/5/10 of the correct composition (label "adj noun"), plus
  ``adj/R@K`` and ``noun/R@K``: a result counts when its adjective (noun) equals the
  target's, as in the TIRG code.
* ``fashioniq``: R@10/50 per category (``dress/R@10``, ...) and their average
  (``avg/R@10``) as the challenge reports them. Options: ``gallery`` = ``split`` (the
  category's whole val gallery, default) or ``triplets`` (only images in the category's
  val queries); ``caption_orders`` = 1 (one query per triplet, ``text`` as stored) or 2
  (one per order of the two ``captions``, joined by " and "); ``exclude_reference``.
* ``cirr``: R@1/5/10/50 against the hard target, reference excluded, and
  ``Rsubset@1/2/3``: the rank of the target among the query's ``members`` without the
  reference. ``cirr_submissions`` writes the test server's JSON files.

Every result also has ``score``: the number model selection uses -- the mean of the
reported recalls, except Fashion-IQ (mean of ``avg/R@10`` and ``avg/R@50``) and CIRR
(``(R@5 + Rsubset@1) / 2``, the benchmark's headline number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DEFAULTS: dict[str, dict[str, Any]] = {
    "css": {"ks": [1, 5, 10, 50], "hit": "label", "exclude_reference": True},
    "fashion200k": {"ks": [1, 10, 50], "hit": "label", "exclude_reference": True},
    "mitstates": {"ks": [1, 5, 10], "hit": "label", "exclude_reference": True},
    "fashioniq": {
        "ks": [10, 50],
        "hit": "id",
        "exclude_reference": True,
        "per_category": True,
        "gallery": "split",
        "caption_orders": 1,
        "categories": ["dress", "shirt", "toptee"],
    },
    "cirr": {"ks": [1, 5, 10, 50], "hit": "id", "exclude_reference": True, "subset_ks": [1, 2, 3]},
}
# named options a user may set (--protocol-option key=value), with their allowed values
OPTIONS: dict[str, dict[str, tuple]] = {
    "exclude_reference": {name: (True, False) for name in DEFAULTS},
    "gallery": {"fashioniq": ("split", "triplets")},
    "caption_orders": {"fashioniq": (1, 2)},
}
CIRR_SUBMISSION_TOP = 50


def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with booleans and integers converted."""
    if "=" not in text:
        raise ValueError(f"protocol option {text!r} must look like key=value")
    key, value = (part.strip() for part in text.split("=", 1))
    lowered = value.lower()
    if lowered in ("true", "yes", "1") and key == "exclude_reference":
        return key, True
    if lowered in ("false", "no", "0") and key == "exclude_reference":
        return key, False
    if value.lstrip("-").isdigit():
        return key, int(value)
    return key, value


def resolve_protocol(
    protocol: dict[str, Any], options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest's protocol with the dataset defaults filled in and ``options`` applied."""
    name = protocol.get("name")
    if name not in DEFAULTS:
        raise ValueError(f"protocol name {name!r}, expected one of {sorted(DEFAULTS)}")
    resolved = {"name": name, **DEFAULTS[name], **protocol}
    for key, value in (options or {}).items():
        allowed = OPTIONS.get(key, {}).get(name)
        if allowed is None:
            known = sorted(k for k, per in OPTIONS.items() if name in per)
            raise ValueError(
                f"protocol option {key!r} does not apply to {name!r}; options: {known}"
            )
        if value not in allowed:
            raise ValueError(
                f"protocol option {key}={value!r} for {name!r}: expected one of {allowed}"
            )
        resolved[key] = value
    resolved["ks"] = sorted(int(k) for k in resolved["ks"])
    if resolved["hit"] not in ("id", "label"):
        raise ValueError(f"protocol hit {resolved['hit']!r}, expected 'id' or 'label'")
    return resolved


def describe_protocol(protocol: dict[str, Any]) -> str:
    """One line naming the protocol and every choice that changes its numbers."""
    parts = [
        f"ks={','.join(map(str, protocol['ks']))}",
        f"hit={protocol['hit']}",
        f"exclude_reference={str(protocol['exclude_reference']).lower()}",
    ]
    if protocol["name"] == "fashioniq":
        parts += [f"gallery={protocol['gallery']}", f"caption_orders={protocol['caption_orders']}"]
    if protocol.get("subset_ks"):
        parts.append(f"subset_ks={','.join(map(str, protocol['subset_ks']))}")
    return f"{protocol['name']}({', '.join(parts)})"


def expand_queries(protocol: dict[str, Any], queries: list[dict]) -> list[dict]:
    """Queries as evaluated: with ``caption_orders`` 2 each Fashion-IQ query becomes two,
    one per order of its two ``captions``."""
    if protocol.get("caption_orders", 1) == 1:
        return list(queries)
    out = []
    for q in queries:
        captions = q.get("captions")
        if not isinstance(captions, list) or len(captions) != 2:
            raise ValueError(
                f"query {q.get('qid')!r}: caption_orders=2 needs 'captions' "
                f"with two texts, got {captions!r}"
            )
        for order, (a, b) in enumerate((captions, captions[::-1])):
            out.append({**q, "text": f"{a} and {b}", "caption_order": order})
    return out


def gallery_label(meta: dict[str, Any]) -> str | None:
    """The label a ``hit: label`` protocol compares (``label``, else ``caption``)."""
    label = meta.get("label", meta.get("caption"))
    return None if label is None else str(label)


def adj_noun(meta: dict[str, Any]) -> tuple[str, str]:
    """MIT-States ``(adj, noun)`` of a gallery image: its ``attributes``, its ``adj`` and
    ``noun`` fields, or its label ``"adj noun"`` split at the first space."""
    attrs = meta.get("attributes")
    if isinstance(attrs, dict) and "adj" in attrs and "noun" in attrs:
        return str(attrs["adj"]), str(attrs["noun"])
    if isinstance(attrs, list) and len(attrs) == 2:
        return str(attrs[0]), str(attrs[1])
    if "adj" in meta and "noun" in meta:
        return str(meta["adj"]), str(meta["noun"])
    label = gallery_label(meta) or ""
    adj, _, noun = label.partition(" ")
    return adj, noun


@dataclass
class RankingPlan:
    """Index arrays that say, per query, where its reference is and what it may retrieve.

    ``ref_index`` (M,): gallery row of the reference; ``exclude`` (M,): row to remove
    (-1: none); ``allowed_group`` (M,) and ``allowed`` (G, N) bool: the query may only
    retrieve rows of ``allowed[allowed_group[i]]`` (``allowed`` None: the whole gallery);
    ``subsets``: per query the gallery rows of its ``members`` minus the reference (CIRR).
    """

    ref_index: np.ndarray
    exclude: np.ndarray
    allowed_group: np.ndarray | None
    allowed: torch.Tensor | None
    subsets: list[np.ndarray] | None


def build_plan(
    protocol: dict[str, Any], queries: list[dict], gallery_ids: list[str], gallery_metas: list[dict]
) -> RankingPlan:
    """``RankingPlan`` of a resolved protocol; raises ``ValueError`` naming a query whose
    reference (or subset member) is not in the gallery."""
    index = {gid: i for i, gid in enumerate(gallery_ids)}
    ref_index = np.array([_row(index, q, q["ref_id"], "ref_id") for q in queries], dtype=np.int64)
    exclude = ref_index.copy() if protocol["exclude_reference"] else np.full(len(queries), -1)
    allowed_group, allowed = None, None
    if protocol.get("per_category"):
        categories = category_order(protocol, queries)
        group_of = {c: g for g, c in enumerate(categories)}
        allowed_group = np.array([group_of[_category(q)] for q in queries], dtype=np.int64)
        allowed = torch.zeros(len(categories), len(gallery_ids), dtype=torch.bool)
        if protocol.get("gallery", "split") == "triplets":
            for q in queries:
                rows = [index[q["ref_id"]]] + [index[t] for t in q["target_ids"] if t in index]
                allowed[group_of[_category(q)], rows] = True
        else:
            for row, meta in enumerate(gallery_metas):
                if meta.get("category") in group_of:
                    allowed[group_of[meta["category"]], row] = True
    subsets = None
    if protocol.get("subset_ks"):
        subsets = []
        for q, ref in zip(queries, ref_index):
            rows = [_row(index, q, m, "members") for m in q.get("members") or []]
            subsets.append(np.array([r for r in rows if r != ref], dtype=np.int64))
    return RankingPlan(ref_index, exclude, allowed_group, allowed, subsets)


def _row(index: dict[str, int], query: dict, gid: str, field: str) -> int:
    if gid not in index:
        raise ValueError(f"query {query.get('qid')!r}: {field} {gid!r} is not in the gallery")
    return index[gid]


def _category(query: dict) -> str:
    if "category" not in query:
        raise ValueError(f"query {query.get('qid')!r} has no 'category' (per-category protocol)")
    return str(query["category"])


def category_order(protocol: dict[str, Any], queries: list[dict]) -> list[str]:
    """Categories in report order: the protocol's list first, then any others, sorted."""
    present = {_category(q) for q in queries}
    listed = [c for c in protocol.get("categories", []) if c in present]
    return listed + sorted(present - set(listed))


def mask_scores(scores: torch.Tensor, plan: RankingPlan, rows: slice) -> torch.Tensor:
    """Set the scores (c, N) of rows a chunk of queries may not retrieve to -inf (in place)."""
    if plan.allowed is not None:
        groups = torch.as_tensor(plan.allowed_group[rows], device=scores.device)
        scores.masked_fill_(~plan.allowed.to(scores.device)[groups], float("-inf"))
    exclude = torch.as_tensor(plan.exclude[rows], device=scores.device)
    has = exclude >= 0
    if bool(has.any()):
        scores[torch.nonzero(has).squeeze(1), exclude[has]] = float("-inf")
    return scores


def rank_scores(
    scores: torch.Tensor, plan: RankingPlan, rows: slice, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of a chunk of the score matrix (c, N) under the plan.

    Returns ``(indices (c, k) int64, scores (c, k))``; positions the query may not fill
    (fewer than k allowed rows) hold index -1 and score -inf.
    """
    scores = mask_scores(scores, plan, rows)
    top_scores, top_idx = scores.topk(min(k, scores.shape[1]), dim=1)
    top_idx = top_idx.masked_fill(torch.isinf(top_scores) & (top_scores < 0), -1)
    return top_idx, top_scores


def subset_candidates(plan: RankingPlan, rows: slice) -> torch.Tensor:
    """(c, S) gallery rows of each query's subset, -1 padded (CIRR Recall_subset)."""
    subsets = plan.subsets[rows]
    width = max([len(s) for s in subsets] + [1])
    out = torch.full((len(subsets), width), -1, dtype=torch.long)
    for i, s in enumerate(subsets):
        out[i, : len(s)] = torch.as_tensor(s)
    return out


def rank_subset(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Order each row's candidates (c, S) by their scores in ``scores`` (c, N); -1 last."""
    valid = candidates >= 0
    picked = scores.gather(1, candidates.clamp(min=0).to(scores.device))
    picked = picked.masked_fill(~valid.to(scores.device), float("-inf"))
    order = picked.argsort(dim=1, descending=True, stable=True)
    return candidates.to(scores.device).gather(1, order)


def hit_matrix(
    protocol: dict[str, Any],
    queries: list[dict],
    gallery_ids: list[str],
    gallery_metas: list[dict],
    ranking: np.ndarray,
) -> np.ndarray:
    """(M, K) bool: whether the j-th result of query i hits its target (-1 never hits)."""
    if protocol["hit"] == "label":
        return hits_by_key(queries, gallery_ids, [gallery_label(m) for m in gallery_metas], ranking)
    return hits_by_key(queries, gallery_ids, None, ranking)


def hits_by_key(
    queries: list[dict], gallery_ids: list[str], keys: list | None, ranking: np.ndarray
) -> np.ndarray:
    """(M, K) bool: whether result j of query i has the key (``keys[row]``; None: the row
    itself) of one of the query's ``target_ids``; rows -1 never hit. Vectorised over the
    whole ranking: a Fashion200k evaluation is 33,480 x 50 results."""
    ranking = np.asarray(ranking, dtype=np.int64)
    index = {gid: i for i, gid in enumerate(gallery_ids)}
    if keys is None:
        codes = np.arange(len(gallery_ids), dtype=np.int64)
    else:
        numbering: dict[Any, int] = {}
        codes = np.array([numbering.setdefault(k, len(numbering)) for k in keys], dtype=np.int64)
    target_rows = [[_row(index, q, t, "target_ids") for t in q["target_ids"]] for q in queries]
    width = max([len(rows) for rows in target_rows] + [1])
    wanted = np.full((len(queries), width), -2, dtype=np.int64)  # -2: never a code
    for i, rows in enumerate(target_rows):
        wanted[i, : len(rows)] = codes[rows]
    if ranking.size == 0 or len(codes) == 0:
        return np.zeros(ranking.shape, dtype=bool)
    found = np.where(ranking >= 0, codes[ranking.clip(min=0)], -1)
    return (found[:, :, None] == wanted[:, None, :]).any(axis=2)


def recall_at(hits: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Percent of queries with a hit in their first k results, per k."""
    if len(hits) == 0:
        return {k: float("nan") for k in ks}
    return {k: 100.0 * float(hits[:, :k].any(axis=1).mean()) for k in ks}


def compute_metrics(
    protocol: dict[str, Any],
    queries: list[dict],
    gallery_ids: list[str],
    gallery_metas: list[dict],
    ranking: np.ndarray,
    subset_ranking: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recalls (percent) of a resolved protocol from the ranked gallery rows (M, K)
    (and the ranked subset rows (M, S) for CIRR). Queries without ``target_ids``
    (test-server queries) are left out; ``queries`` counts the ones evaluated."""
    ranking = np.asarray(ranking)
    scored = [i for i, q in enumerate(queries) if q.get("target_ids")]
    qs = [queries[i] for i in scored]
    top = ranking[scored] if len(scored) else ranking[:0]
    if top.shape[1] < max(protocol["ks"]) and top.shape[1] < len(gallery_ids):
        raise ValueError(
            f"ranking has {top.shape[1]} columns, the protocol needs {max(protocol['ks'])}"
        )
    hits = hit_matrix(protocol, qs, gallery_ids, gallery_metas, top)
    metrics: dict[str, Any] = {}
    name, ks = protocol["name"], protocol["ks"]
    if protocol.get("per_category"):
        categories = category_order(protocol, qs) if qs else []
        for cat in categories:
            rows = [i for i, q in enumerate(qs) if _category(q) == cat]
            for k, r in recall_at(hits[rows], ks).items():
                metrics[f"{cat}/R@{k}"] = r
        for k in ks:
            metrics[f"avg/R@{k}"] = (
                float(np.mean([metrics[f"{c}/R@{k}"] for c in categories]))
                if categories
                else float("nan")
            )
    else:
        for k, r in recall_at(hits, ks).items():
            metrics[f"R@{k}"] = r
    if name == "mitstates":
        parts = [adj_noun(m) for m in gallery_metas]
        for which, pos in (("adj", 0), ("noun", 1)):
            part_hits = hits_by_key(qs, gallery_ids, [p[pos] for p in parts], top)
            for k, r in recall_at(part_hits, ks).items():
                metrics[f"{which}/R@{k}"] = r
    if protocol.get("subset_ks"):
        if subset_ranking is None:
            raise ValueError("the protocol reports Recall_subset: pass subset_ranking")
        sub = np.asarray(subset_ranking)[scored] if len(scored) else np.zeros((0, 1), int)
        sub_hits = hit_matrix({**protocol, "hit": "id"}, qs, gallery_ids, gallery_metas, sub)
        for k, r in recall_at(sub_hits, protocol["subset_ks"]).items():
            metrics[f"Rsubset@{k}"] = r
    metrics["score"] = headline_score(protocol, metrics)
    metrics["queries"] = len(qs)
    return metrics


def headline_score(protocol: dict[str, Any], metrics: dict[str, float]) -> float:
    """The single number for model selection (see the module docstring)."""
    if protocol["name"] == "fashioniq":
        return float(np.mean([metrics[f"avg/R@{k}"] for k in protocol["ks"]]))
    if protocol["name"] == "cirr" and "R@5" in metrics and "Rsubset@1" in metrics:
        return (metrics["R@5"] + metrics["Rsubset@1"]) / 2
    return float(np.mean([metrics[f"R@{k}"] for k in protocol["ks"]]))


def cirr_submissions(
    queries: list[dict], gallery_ids: list[str], ranking: np.ndarray, subset_ranking: np.ndarray
) -> tuple[dict, dict]:
    """The CIRR test server's two files: ``recall`` (top-50 ids per pairid) and
    ``recall_subset`` (top-3 member ids per pairid), reference already excluded."""
    recall: dict[str, Any] = {"version": "rc2", "metric": "recall"}
    subset: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
    for i, q in enumerate(queries):
        if "pairid" not in q:
            raise ValueError(f"query {q.get('qid')!r} has no 'pairid' (CIRR submission)")
        pairid = str(q["pairid"])
        recall[pairid] = [gallery_ids[r] for r in ranking[i][:CIRR_SUBMISSION_TOP] if r >= 0]
        subset[pairid] = [gallery_ids[r] for r in subset_ranking[i][:3] if r >= 0]
    return recall, subset
