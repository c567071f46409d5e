"""A PNG grid of queries and their top results, for a person to look at.

Each row: the reference image with the modification text under it, then the top-5
results; results that hit the target (by the protocol's rule) are outlined green,
misses red.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.gallery_data import read_gallery_bytes
from pipeline.protocols import hit_matrix

THUMB = 112
BORDER = 4
TEXT_HEIGHT = 40
GREEN, RED, GREY = (30, 170, 60), (210, 40, 40), (150, 150, 150)


def _thumbnail(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = ImageOps.contain(image, (THUMB, THUMB))  # scales small images up too
    canvas = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    canvas.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    return canvas


def draw_grid(rows: list[dict[str, Any]]) -> Image.Image:
    """``rows``: ``{"reference": bytes, "text": str, "results": [(bytes, id, hit), ...]}``
    -> one RGB image, a row per query."""
    if not rows:
        raise ValueError("draw_grid needs at least one query row")
    columns = 1 + max(len(r["results"]) for r in rows)
    cell_w, cell_h = THUMB + 2 * BORDER, THUMB + 2 * BORDER + TEXT_HEIGHT
    grid = Image.new("RGB", (columns * cell_w, len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        top = r * cell_h
        grid.paste(_thumbnail(row["reference"]), (BORDER, top + BORDER))
        text = "\n".join(textwrap.wrap(row["text"], width=20)[:3])
        draw.multiline_text((BORDER, top + THUMB + 2 * BORDER), text, fill=(0, 0, 0), font=font)
        for c, (data, gid, hit) in enumerate(row["results"], start=1):
            left = c * cell_w
            color = GREEN if hit else RED
            draw.rectangle([left, top, left + cell_w - 1, top + THUMB + 2 * BORDER - 1], fill=color)
            grid.paste(_thumbnail(data), (left + BORDER, top + BORDER))
            draw.text(
                (left + BORDER, top + THUMB + 2 * BORDER),
                str(gid)[:20],
                fill=GREY if not hit else GREEN,
                font=font,
            )
    return grid


def save_retrieval_grid(
    path: str | Path,
    dataset_dir: str | Path,
    gallery_split: str,
    protocol: dict[str, Any],
    queries: list[dict],
    gallery_ids: list[str],
    gallery_metas: list[dict],
    ranking: np.ndarray,
    *,
    max_queries: int = 8,
    top: int = 5,
) -> Path:
    """Draw the first ``max_queries`` queries that have targets with their ``top``
    results and write the PNG to ``path``."""
    chosen = [i for i, q in enumerate(queries) if q.get("target_ids")][:max_queries]
    if not chosen:
        chosen = list(range(min(max_queries, len(queries))))
    picked = [queries[i] for i in chosen]
    results = np.asarray(ranking)[chosen][:, :top]
    if all(q.get("target_ids") for q in picked):
        hits = hit_matrix(protocol, picked, gallery_ids, gallery_metas, results)
    else:
        hits = np.zeros(results.shape, dtype=bool)
    needed = {q["ref_id"] for q in picked} | {gallery_ids[r] for r in results.ravel() if r >= 0}
    images = read_gallery_bytes(dataset_dir, gallery_split, ids=needed)
    rows = []
    for q, result_rows, hit_row in zip(picked, results, hits):
        rows.append(
            {
                "reference": images[q["ref_id"]][0],
                "text": q["text"],
                "results": [
                    (images[gallery_ids[r]][0], gallery_ids[r], bool(h))
                    for r, h in zip(result_rows, hit_row)
                    if r >= 0
                ],
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(rows).save(path)
    return path
