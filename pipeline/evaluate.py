"""Evaluate a model on a dataset's evaluation set (``pipeline.protocols``), batched on
the device.

The gallery is embedded once: ``encode_image`` gives each catalogue image's stored
representation and ``embed_target`` its target embedding (N, D) (kept on the device).
The representations stay on a GPU while they fit half its free memory (so the whole
evaluation runs there in one pass) and move to the CPU otherwise, so million-image
galleries fit. Queries are composed from the stored representations of their reference
images -- a query's ``ref_id`` is a gallery id, as in serving -- then scored against all
targets by one matrix product per block of ``query_batch_size`` queries (default 1024
on a GPU, the image batch on a CPU), and ranked under the protocol.

CCNet (models with ``has_correction``) re-ranks each query's top ``rerank_top``
candidates with Eq. 15 of the CCNet paper: the sum of the composition network's
log-softmax over the gallery and the correction network's log-softmax over the
candidates (``rerank_with_correction``, which serving imports).

CLI::

    python -m pipeline.evaluate --checkpoint runs/css_tirg/checkpoint --data data/css \\
        [--eval test] [--batch-size 256] [--device cuda] [--protocol-option gallery=triplets] \\
        [--grid grid.png] [--json-out metrics.json] [--submission-dir submit/]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import protocols
from pipeline.gallery_cache import GalleryCache
from pipeline.gallery_data import gallery_loader
from pipeline.images import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.base import Repr
from pipeline.rerank import (  # noqa: F401  (re-exported: evaluation's re-ranking)
    DEFAULT_LOGIT_SCALE,
    composition_logit_scale,
    gather_rows,
    model_device,
    rerank_with_correction,
)
from pipeline.vocab import Vocabulary
from shards.manifest import default_eval, load_manifest, load_queries

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_gallery_with_metas(
    model: nn.Module,
    dataset_dir: str | Path,
    split: str,
    *,
    image_cfg: dict[str, Any],
    batch_size: int,
    device: str | torch.device,
    loader_workers: int = 0,
    show_progress: bool = False,
    gallery_cache: GalleryCache | None = None,
) -> tuple[list[str], Repr, torch.Tensor, list[dict]]:
    """``embed_gallery`` plus each image's metadata; with ``gallery_cache`` (that split,
    decoded once: ``pipeline.gallery_cache``) no shard is read."""
    device = torch.device(device)
    mean, std = image_cfg.get("mean", IMAGENET_MEAN), image_cfg.get("std", IMAGENET_STD)
    if gallery_cache is not None:
        gallery_cache.check_matches(dataset_dir, split, int(image_cfg["size"]))
        batches = gallery_cache.batches(batch_size, mean, std)
    else:
        batches = gallery_loader(
            dataset_dir,
            split,
            batch_size=batch_size,
            image_size=int(image_cfg["size"]),
            mean=mean,
            std=std,
            loader_workers=loader_workers,
            device=device,
        )
    ids: list[str] = []
    metas: list[dict] = []
    reprs: list[Repr] = []
    targets: list[torch.Tensor] = []
    # representations stay on a GPU while they fit half its free memory
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 0
    held = 0
    for batch_ids, images, batch_metas in tqdm(
        batches, desc="gallery", unit="batch", disable=not show_progress
    ):
        image_repr = model.encode_image(images.to(device))
        targets.append(model.embed_target(image_repr).float())
        was_on_device = held <= budget
        held += sum(r.numel() * r.element_size() for r in image_repr)
        if held > budget and was_on_device:  # just went over: what is held moves to the host
            reprs = [tuple(r.cpu() for r in rep) for rep in reprs]
        reprs.append(tuple(r.detach().cpu() if held > budget else r.detach() for r in image_repr))
        ids += batch_ids
        metas += batch_metas
    if not ids:
        raise ValueError(f"gallery split {split!r} of {dataset_dir} is empty")
    stacked = tuple(torch.cat([r[i] for r in reprs]) for i in range(len(reprs[0])))
    return ids, stacked, torch.cat(targets), metas


def eval_autocast(device: torch.device, amp: bool):
    """bf16 autocast for evaluation's forward passes when ``amp`` (a GPU run trained
    with ``train.amp``), else nothing; the score matrix is computed in fp32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def embed_gallery(
    model: nn.Module,
    dataset_dir: str | Path,
    split: str,
    *,
    image_cfg: dict[str, Any],
    batch_size: int,
    device: str | torch.device,
) -> tuple[list[str], Repr, torch.Tensor]:
    """Every image of a gallery split -> ``(ids, image_repr, targets)``.

    ``image_repr``: tuple of (N, ...) CPU tensors (``encode_image``); ``targets``: (N, D)
    unit vectors on ``device`` (``embed_target``). ``image_cfg`` = ``{size, mean, std}``.
    """
    ids, image_repr, targets, _ = embed_gallery_with_metas(
        model, dataset_dir, split, image_cfg=image_cfg, batch_size=batch_size, device=device
    )
    return ids, image_repr, targets


@torch.inference_mode()
def rank_queries(
    model: nn.Module,
    vocab: Vocabulary,
    queries: list[dict],
    plan,
    *,
    gallery_repr: Repr,
    targets: torch.Tensor,
    k: int,
    batch_size: int,
    rerank_top: int = 0,
    subsets: bool = False,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Compose every query, score it against all ``targets`` and rank under ``plan``.

    Returns ``(ranking (M, k) gallery rows, subset ranking (M, S) or None)``.
    """
    device = targets.device
    if plan.allowed is not None:
        plan.allowed = plan.allowed.to(device)  # moved once, not per chunk
    correct = bool(getattr(model, "has_correction", False)) and rerank_top > 0
    lam = composition_logit_scale(model)
    rankings, subset_rankings = [], []
    for start in tqdm(
        range(0, len(queries), batch_size), desc="queries", unit="batch", disable=not show_progress
    ):
        rows = slice(start, start + batch_size)
        chunk = queries[rows]
        tokens, lengths = vocab.encode([q["text"] for q in chunk])
        text_repr = model.encode_text(tokens.to(device), lengths.to(device))
        ref_rows = torch.as_tensor(plan.ref_index[rows])
        ref_repr = gather_rows(gallery_repr, ref_rows, device)
        composed = model.compose(ref_repr, text_repr).float()
        with torch.autocast(device.type, enabled=False):  # scores in fp32 under bf16 forwards
            scores = composed @ targets.T  # (c, N)
        top_idx, top_scores = protocols.rank_scores(scores, plan, rows, k)  # masks in place
        if subsets:
            candidates = protocols.subset_candidates(plan, rows).to(device)
        if correct:
            lse = torch.logsumexp(lam * scores, dim=1)
            head = min(rerank_top, top_idx.shape[1])
            reranked, _ = rerank_with_correction(
                model,
                ref_repr=ref_repr,
                text_repr=text_repr,
                gallery_repr=gallery_repr,
                candidates=top_idx[:, :head],
                candidate_scores=top_scores[:, :head],
                gallery_logsumexp=lse,
                logit_scale=lam,
            )
            top_idx = torch.cat([reranked, top_idx[:, head:]], dim=1)
            if subsets:
                valid = candidates >= 0
                # masking removed only the reference, which is not among the members
                cand_scores = scores.gather(1, candidates.clamp(min=0))
                cand_scores = cand_scores.masked_fill(~valid, float("-inf"))
                subset_rank, _ = rerank_with_correction(
                    model,
                    ref_repr=ref_repr,
                    text_repr=text_repr,
                    gallery_repr=gallery_repr,
                    candidates=candidates,
                    candidate_scores=cand_scores,
                    gallery_logsumexp=lse,
                    logit_scale=lam,
                )
                subset_rankings.append(subset_rank.cpu().numpy())
        elif subsets:
            subset_rankings.append(protocols.rank_subset(scores, candidates).cpu().numpy())
        rankings.append(top_idx.cpu().numpy())
    ranking = np.concatenate(rankings) if rankings else np.zeros((0, k), dtype=np.int64)
    subset_ranking = None
    if subsets:
        width = max([s.shape[1] for s in subset_rankings] + [1])
        subset_ranking = (
            np.concatenate(
                [
                    np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-1)
                    for s in subset_rankings
                ]
            )
            if subset_rankings
            else np.zeros((0, 1), dtype=np.int64)
        )
    return ranking, subset_ranking


def evaluate_model(
    model: nn.Module,
    vocab: Vocabulary,
    dataset_dir: str | Path,
    *,
    eval_name: str | None = None,
    image_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    batch_size: int = 256,
    query_batch_size: int | None = None,
    device: str | torch.device = "cpu",
    protocol_options: dict[str, Any] | None = None,
    rerank_top: int = 100,
    grid_png: str | Path | None = None,
    submission_dir: str | Path | None = None,
    loader_workers: int = 0,
    show_progress: bool = False,
    gallery_cache: GalleryCache | None = None,
    amp: bool = False,
) -> dict[str, Any]:
    """Recalls of ``model`` on evaluation set ``eval_name`` (default: the manifest's first).

    Returns the protocol's metrics (percent floats, ``score``, ``queries``) plus
    ``protocol``: a one-line description of the protocol and its options. ``grid_png``
    writes a picture of the first queries' top-5 results; ``submission_dir`` writes
    CIRR's test-server JSON files. ``gallery_cache``: the evaluation set's gallery
    decoded once (``pipeline.gallery_cache``), for repeated evaluations. ``amp``: the
    model's forward passes under bf16 autocast (``eval_autocast``; scores stay fp32).
    """
    device = torch.device(device)
    if query_batch_size is None:
        query_batch_size = max(batch_size, 1024) if device.type == "cuda" else batch_size
    manifest = load_manifest(dataset_dir)
    eval_name = eval_name or default_eval(manifest)
    queries_raw = load_queries(dataset_dir, manifest, eval_name)
    ev = manifest["evals"][eval_name]
    protocol = protocols.resolve_protocol(ev["protocol"], protocol_options)
    queries = protocols.expand_queries(protocol, queries_raw)
    if not queries:
        raise ValueError(f"evaluation set {eval_name!r} of {dataset_dir} has no queries")
    was_training = model.training
    model.eval()
    try:
        with eval_autocast(device, amp):
            ids, gallery_repr, targets, metas = embed_gallery_with_metas(
                model,
                dataset_dir,
                ev["gallery"],
                image_cfg={"size": image_size, "mean": mean, "std": std},
                batch_size=batch_size,
                device=device,
                loader_workers=loader_workers,
                show_progress=show_progress,
                gallery_cache=gallery_cache,
            )
            plan = protocols.build_plan(protocol, queries, ids, metas)
            k = max(protocol["ks"])
            if protocol.get("subset_ks"):
                k = max(k, protocols.CIRR_SUBMISSION_TOP)
            if getattr(model, "has_correction", False):
                k = max(k, rerank_top)
            ranking, subset_ranking = rank_queries(
                model,
                vocab,
                queries,
                plan,
                gallery_repr=gallery_repr,
                targets=targets,
                k=min(k, len(ids)),
                batch_size=query_batch_size,
                rerank_top=rerank_top,
                subsets=bool(protocol.get("subset_ks")),
                show_progress=show_progress,
            )
    finally:
        model.train(was_training)
    metrics = protocols.compute_metrics(protocol, queries, ids, metas, ranking, subset_ranking)
    metrics["protocol"] = protocols.describe_protocol(protocol)
    metrics["eval"] = eval_name
    log.info("%s %s: %s", dataset_dir, metrics["protocol"], format_metrics(metrics, one_line=True))
    if submission_dir is not None:
        write_submissions(
            submission_dir, eval_name, protocol, queries, ids, ranking, subset_ranking
        )
    if grid_png is not None:
        from pipeline.visualize import save_retrieval_grid

        save_retrieval_grid(
            grid_png, dataset_dir, ev["gallery"], protocol, queries, ids, metas, ranking
        )
    return metrics


def write_submissions(
    directory: str | Path,
    eval_name: str,
    protocol: dict[str, Any],
    queries: list[dict],
    ids: list[str],
    ranking: np.ndarray,
    subset_ranking: np.ndarray | None,
) -> list[Path]:
    """CIRR test-server files ``<eval>-recall.json`` and ``<eval>-recall_subset.json``."""
    if protocol["name"] != "cirr":
        raise ValueError(f"submission files exist for CIRR only, not {protocol['name']!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recall, subset = protocols.cirr_submissions(queries, ids, ranking, subset_ranking)
    paths = [directory / f"{eval_name}-recall.json", directory / f"{eval_name}-recall_subset.json"]
    for path, content in zip(paths, (recall, subset)):
        path.write_text(json.dumps(content))
    return paths


def format_metrics(metrics: dict[str, Any], one_line: bool = False) -> str:
    """A table (or one line) of the metrics, the protocol first."""
    numbers = [(k, v) for k, v in metrics.items() if k not in ("protocol", "eval")]
    if one_line:
        return "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers)
    width = max(len(k) for k, _ in numbers)
    lines = [f"eval set: {metrics.get('eval')}", f"protocol: {metrics.get('protocol')}"]
    lines += [
        f"{k:<{width}}  {v:8.2f}" if isinstance(v, float) else f"{k:<{width}}  {v:>8}"
        for k, v in numbers
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or file")
    parser.add_argument("--data", required=True, help="shard dataset directory")
    parser.add_argument("--eval", default=None, help="evaluation set (default: the first)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument(
        "--protocol-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. gallery=triplets, caption_orders=2, exclude_reference=false",
    )
    parser.add_argument(
        "--rerank-top",
        type=int,
        default=None,
        help="CCNet: candidates to re-rank (default: the checkpoint's config)",
    )
    parser.add_argument("--grid", default=None, help="write a PNG of queries and their top-5")
    parser.add_argument("--json-out", default=None, help="write the metrics as JSON")
    parser.add_argument("--submission-dir", default=None, help="CIRR: write test-server JSONs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipeline.checkpoint import load_model

    model, vocab, payload = load_model(args.checkpoint, device=args.device)
    config = payload.get("config") or {}
    image = config.get("image") or {}
    if "size" not in image:
        parser.error(f"{args.checkpoint}: config has no image.size")
    rerank_top = args.rerank_top
    if rerank_top is None:
        rerank_top = int((config.get("eval") or {}).get("rerank_top") or 100)
    options = dict(protocols.parse_option(o) for o in args.protocol_option)
    metrics = evaluate_model(
        model,
        vocab,
        args.data,
        eval_name=args.eval,
        image_size=int(image["size"]),
        mean=image.get("mean", IMAGENET_MEAN),
        std=image.get("std", IMAGENET_STD),
        batch_size=args.batch_size,
        device=args.device,
        protocol_options=options,
        rerank_top=rerank_top,
        grid_png=args.grid,
        submission_dir=args.submission_dir,
        loader_workers=args.loader_workers,
        show_progress=sys.stderr.isatty(),
    )
    metrics["checkpoint"] = str(args.checkpoint)
    metrics["step"] = int(payload.get("step", 0))
    print(format_metrics({k: v for k, v in metrics.items() if k != "checkpoint"}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
