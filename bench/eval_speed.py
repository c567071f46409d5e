"""Evaluation speed at Fashion200k's size: one pass over a gallery held on the device.

Times ``pipeline.evaluate``'s own functions, as a training run's evaluation calls them
on a cached gallery (``eval.image_cache``): embedding every gallery image from the
uint8 cache (``embed_gallery_with_metas``), composing every query in blocks and
ranking it by one matrix product per block (``rank_queries``), and the recalls
(``protocols.compute_metrics``). The gallery is random pixels and the queries random
texts over a random-weight model (the timing does not depend on the weights); the
sizes default to Fashion200k's test split (33,480 queries over 29,789 images, 224 px,
ResNet-18 TIRG, D = 512). Decoding is not in the pass: the cache decodes once per run.
The authors' code ranks that split per query in numpy (41.7 s on an H100 for the ranking
alone); the target here is the whole pass in under 2 s on an H200.

    python -m bench.eval_speed --device cuda                    # the full size
    python -m bench.eval_speed --gallery 2000 --queries 2000 --image-size 64   # CPU check

Prints a table and writes JSON (default ``docs/results/<gpu>-<date>/eval_speed.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.train_throughput import environment, gpu_name, results_dir, synthetic_vocab
from pipeline import protocols
from pipeline.evaluate import embed_gallery_with_metas, eval_autocast, rank_queries
from pipeline.gallery_cache import GalleryCache
from pipeline.models import create_model

ROOT = Path(__file__).resolve().parent.parent
FASHION200K = {"gallery": 29789, "queries": 33480}
TARGET_S_H200 = 2.0
DATASET = "synthetic"  # the cache's dataset name: no shard is read


def synthetic_gallery(count: int, size: int, labels: int, device: torch.device) -> GalleryCache:
    """``count`` random uint8 images (3, size, size) on ``device``, ``labels`` classes."""
    generator = torch.Generator(device).manual_seed(0)  # drawn where it is held: 4.5 GB at 224 px
    shape = (count, 3, size, size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator, device=device)
    ids = [f"g{i:06d}" for i in range(count)]
    metas = [{"id": gid, "label": f"label{i % labels}"} for i, gid in enumerate(ids)]
    return GalleryCache(DATASET, "gallery", ids, metas, images)


def synthetic_queries(count: int, gallery: GalleryCache, vocab_size: int) -> list[dict]:
    """Fashion200k-shaped queries: a gallery reference, "replace wA with wB", a target."""
    generator = torch.Generator().manual_seed(1)
    refs = torch.randint(0, len(gallery.ids), (count,), generator=generator).tolist()
    targets = torch.randint(0, len(gallery.ids), (count,), generator=generator).tolist()
    words = torch.randint(0, vocab_size - 2, (count, 2), generator=generator).tolist()
    return [
        {
            "qid": i,
            "ref_id": gallery.ids[ref],
            "text": f"replace w{a} with w{b}",
            "target_ids": [gallery.ids[target]],
        }
        for i, (ref, target, (a, b)) in enumerate(zip(refs, targets, words))
    ]


class PhaseClock:
    """Wall time of named phases, with the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def one_pass(model, vocab, gallery, queries, args, device) -> tuple[dict[str, float], dict]:
    """Embed, rank and score once; ``(seconds per phase, metrics)``."""
    protocol = protocols.resolve_protocol({"name": "fashion200k"})
    clock = PhaseClock(device)
    with clock.phase("gallery_embedding"), eval_autocast(device, args.amp):
        ids, gallery_repr, targets, metas = embed_gallery_with_metas(
            model,
            DATASET,
            "gallery",
            image_cfg={"size": args.image_size},
            batch_size=args.batch_size,
            device=device,
            gallery_cache=gallery,
        )
    with clock.phase("compose_and_rank"), eval_autocast(device, args.amp):
        plan = protocols.build_plan(protocol, queries, ids, metas)
        ranking, _ = rank_queries(
            model,
            vocab,
            queries,
            plan,
            gallery_repr=gallery_repr,
            targets=targets,
            k=max(protocol["ks"]),
            batch_size=args.query_batch_size,
        )
    with clock.phase("recalls"):
        metrics = protocols.compute_metrics(protocol, queries, ids, metas, ranking)
    seconds = dict(clock.seconds)
    seconds["total"] = sum(seconds.values())
    return seconds, metrics


def print_table(row: dict[str, Any]) -> None:
    print(f"device: {row['gpu']}")
    print(
        f"{row['model']} {row['image_size']} px, {row['gallery']} gallery images x "
        f"{row['queries']} queries, gallery batch {row['batch']}, query block "
        f"{row['query_batch']}, {'bf16' if row['amp'] else 'fp32'}, "
        f"median of {row['repeats']} passes after a warm-up"
    )
    print(f"{'phase':<18} {'seconds':>8}")
    for name, value in row["seconds"].items():
        print(f"{name:<18} {value:>8.3f}")
    print(
        f"gallery {row['gallery_images_per_s']:.0f} img/s, "
        f"queries {row['queries_per_s']:.0f} /s (composition + ranking)"
    )
    if row["target_s_h200"] is not None:
        verdict = "meets" if row["seconds"]["total"] <= row["target_s_h200"] else "misses"
        print(f"H200 target: {row['target_s_h200']} s for the whole pass ({verdict} it here)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_speed", description=__doc__)
    parser.add_argument("--model", default="tirg")
    parser.add_argument("--gallery", type=int, default=FASHION200K["gallery"])
    parser.add_argument("--queries", type=int, default=FASHION200K["queries"])
    parser.add_argument("--labels", type=int, default=5000, help="gallery classes (label hits)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=512, help="gallery images per pass")
    parser.add_argument("--query-batch-size", type=int, default=4096, help="queries per block")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    for name in ("gallery", "queries", "labels", "batch_size", "query_batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.amp = device.type == "cuda" if args.amp is None else args.amp

    vocab = synthetic_vocab()
    torch.manual_seed(0)
    model = create_model(args.model, vocab_size=len(vocab), embed_dim=args.embed_dim)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    gallery = synthetic_gallery(args.gallery, args.image_size, args.labels, device)
    queries = synthetic_queries(args.queries, gallery, len(vocab))

    one_pass(model, vocab, gallery, queries, args, device)  # warm-up: kernels, autotuning
    passes = [one_pass(model, vocab, gallery, queries, args, device) for _ in range(args.repeats)]
    seconds = {name: statistics.median(p[0][name] for p in passes) for name in passes[0][0]}
    row = {
        "gpu": gpu_name(device),
        "model": args.model,
        "image_size": args.image_size,
        "gallery": args.gallery,
        "queries": args.queries,
        "batch": args.batch_size,
        "query_batch": args.query_batch_size,
        "amp": bool(args.amp),
        "repeats": args.repeats,
        "seconds": seconds,
        "gallery_images_per_s": args.gallery / seconds["gallery_embedding"],
        "queries_per_s": args.queries / seconds["compose_and_rank"],
        "target_s_h200": TARGET_S_H200
        if (args.gallery, args.queries) == tuple(FASHION200K.values())
        else None,
        "R@1_random_model": passes[-1][1]["R@1"],
        "environment": environment(),
    }
    print_table(row)
    out = args.out or results_dir(ROOT / "docs" / "results", device.type == "cuda") / (
        "eval_speed.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
