"""``export.index --shards N`` and ``--faiss`` on a complete gallery index: the shard
listing (``serve.sharding``) and the approximate faiss layout, one per shard, with its
recall@10 against exact search measured and stored in ``index.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from export.artifacts import write_json_atomic


def add_layouts(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--shards`` and ``--faiss`` on a complete index; returns what they recorded."""
    from serve.gallery import GalleryIndex
    from serve.sharding import index_shards, shard_dir, write_shards

    index = GalleryIndex(out)
    recorded: dict[str, Any] = {}
    if args.shards is not None:
        recorded["shards"] = write_shards(out, len(index), args.shards)
    if args.faiss:
        from serve.faiss_build import build_faiss

        ranges = index_shards(out, len(index))
        recorded["faiss"] = []
        for i, (start, end) in enumerate(ranges):
            target = shard_dir(out, i, len(ranges))
            target.mkdir(exist_ok=True)
            recorded["faiss"].append(
                build_faiss(
                    index.embeddings[start:end],
                    target,
                    nlist=args.faiss_nlist,
                    m=args.faiss_m,
                    candidates=args.faiss_candidates,
                )
            )
        info = json.loads((out / "index.json").read_text())
        info["faiss"] = recorded["faiss"]  # settings and measured recall@10, per shard
        write_json_atomic(out / "index.json", info)
    index.close()
    return recorded
