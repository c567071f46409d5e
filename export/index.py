"""Gallery index: every catalogue image embedded by the exported image encoder + target head.

    python -m export.index --artifacts ART_DIR --data SHARDS [--split gallery] [--out DIR]
                           [--dtype float16|float32] [--batch-size 64]
                           [--backend onnxruntime|torch] [--threads N] [--loader-workers N]

Writes ``DIR`` (default ``ART_DIR/index``), the layout serving memory-maps::

    index.json         {"format": "composed-retrieval-index/1", "count": N, "embed_dim": D,
                        "dtype", "repr": {name: {"shape", "dtype"}}, "dataset", "split",
                        "checkpoint_sha256", "complete": true}   (written last)
    ids.json           N ids in row order
    meta.jsonl         one JSON per row: id, label, caption, category, ext
    embeddings.npy     (N, D) target embeddings (unit rows)
    repr_<name>.npy    (N, ...) image representations (compose queries without re-encoding)
    images.bin         encoded images; row i is images.bin[offsets[i]:offsets[i + 1]]
    image_offsets.npy  (N + 1,) int64

The gallery streams through ``pipeline.data.gallery_loader`` in shard order. Rows are
written in place into pre-sized ``.npy`` files; after every batch ``progress.json``
records the rows done and the byte lengths of ``images.bin`` and ``meta.jsonl``, so an
interrupted build reruns from the last completed batch (bytes past the recorded lengths
are cut off). A build for other artifacts, data or dtype starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from export.artifacts import ArtifactError, write_json_atomic
from export.index_layouts import add_layouts
from export.runtime import GraphRuntime, open_runtime

log = logging.getLogger(__name__)

INDEX_FORMAT = "composed-retrieval-index/1"
INDEX_DIR = "index"
PROGRESS_FILE = "progress.json"
DTYPES = ("float16", "float32")


def index_settings(
    runtime: GraphRuntime, data: Path, manifest: dict[str, Any], split: str, dtype: str
) -> dict[str, Any]:
    """What an index is built from; a resumed build must have the same settings."""
    outputs = runtime.artifacts.graph("image_encoder").outputs
    reprs = {}
    for name in runtime.image_repr_names:
        shape = outputs[f"repr_{name}"][1:]
        if not all(isinstance(d, int) for d in shape):
            raise ArtifactError(
                f"{runtime.artifacts.dir}: image representation {name!r} has shape "
                f"{outputs[f'repr_{name}']}; only the batch dim may vary"
            )
        reprs[name] = {"shape": shape, "dtype": dtype}
    return {
        "format": INDEX_FORMAT,
        "count": int(manifest["splits"][split]["samples"]),
        "embed_dim": runtime.embed_dim,
        "dtype": dtype,
        "repr": reprs,
        "dataset": manifest["name"],
        "data": str(data.resolve()),
        "split": split,
        "checkpoint_sha256": runtime.artifacts.checkpoint_sha256,
    }


class IndexFiles:
    """The open files of an index being built: memory-mapped arrays + append-only files."""

    def __init__(self, out: Path, settings: dict[str, Any], fresh: bool):
        count, dim, dtype = settings["count"], settings["embed_dim"], settings["dtype"]
        mode = "w+" if fresh else "r+"

        def array(name: str, shape: tuple, kind: str) -> np.memmap:
            path = out / name
            arr = np.lib.format.open_memmap(
                path, mode=mode, dtype=kind, shape=shape if fresh else None
            )
            if arr.shape != shape or arr.dtype != np.dtype(kind):
                raise ArtifactError(
                    f"{path}: shape {arr.shape} {arr.dtype}, expected {shape} "
                    f"{kind} (delete {out} to rebuild)"
                )
            return arr

        self.embeddings = array("embeddings.npy", (count, dim), dtype)
        self.reprs = {
            name: array(f"repr_{name}.npy", (count, *info["shape"]), dtype)
            for name, info in settings["repr"].items()
        }
        self.offsets = array("image_offsets.npy", (count + 1,), "int64")
        for name in ("images.bin", "meta.jsonl"):
            if fresh:
                (out / name).write_bytes(b"")
        self.images = open(out / "images.bin", "r+b")
        self.meta = open(out / "meta.jsonl", "r+b")

    def truncate(self, images_bytes: int, meta_bytes: int) -> None:
        """Cut off what a crash wrote after the last recorded batch."""
        for fh, size in ((self.images, images_bytes), (self.meta, meta_bytes)):
            fh.truncate(size)
            fh.seek(size)

    def write_rows(
        self,
        start: int,
        targets: np.ndarray,
        reprs: dict[str, np.ndarray],
        images: list[bytes],
        metas: list[dict[str, Any]],
    ) -> None:
        end = start + len(targets)
        self.embeddings[start:end] = targets
        for name, arr in self.reprs.items():
            arr[start:end] = reprs[name]
        sizes = np.cumsum([len(b) for b in images], dtype=np.int64)
        self.offsets[start + 1 : end + 1] = self.offsets[start] + sizes
        self.images.write(b"".join(images))
        self.meta.write(b"".join(json.dumps(m).encode() + b"\n" for m in metas))
        for arr in (self.embeddings, self.offsets, *self.reprs.values()):
            arr.flush()
        for fh in (self.images, self.meta):
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        self.images.close()
        self.meta.close()


def gallery_batches(
    data: Path, split: str, batch_size: int, preprocess: dict[str, Any], loader_workers: int
) -> Iterator[tuple[list[str], torch.Tensor, list[dict]]]:
    """``(ids, images (B, 3, S, S) float32 tensor, row metas with ext + encoded bytes)`` in shard
    order: ``gallery_loader``'s decoded batches zipped with the shards' raw bytes."""
    from pipeline.gallery_data import gallery_loader, iter_gallery_samples

    raw = iter_gallery_samples(data, split)
    loader = gallery_loader(
        data,
        split,
        batch_size=batch_size,
        image_size=int(preprocess["crop"]),
        mean=preprocess["mean"],
        std=preprocess["std"],
        loader_workers=loader_workers,
    )
    for ids, images, metas in loader:
        rows = []
        for gid, meta in zip(ids, metas):
            raw_meta, data_bytes, ext = next(raw)
            if str(raw_meta["id"]) != gid:
                raise ValueError(f"{data}: gallery streams disagree at id {gid!r}")
            rows.append(
                {
                    "id": gid,
                    "label": meta.get("label"),
                    "caption": meta.get("caption"),
                    "category": meta.get("category"),
                    "ext": ext,
                    "bytes": data_bytes,
                }
            )
        yield ids, images, rows


def build_index(
    art_dir: str | Path,
    data: str | Path,
    *,
    split: str = "gallery",
    out: str | Path | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    backend: str = "onnxruntime",
    threads: int = 0,
    loader_workers: int = 0,
    runtime: GraphRuntime | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build (or resume) the gallery index; returns its ``index.json`` dict."""
    from shards.manifest import ManifestError, load_manifest

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if runtime is None:
        options = {"threads": threads} if backend == "onnxruntime" else {}
        runtime = open_runtime(art_dir, backend, **options)
    data = Path(data)
    manifest = load_manifest(data)
    if manifest["splits"].get(split, {}).get("kind") != "gallery":
        raise ManifestError(
            f"{data}: split {split!r} is not a gallery split "
            f"(gallery splits: {[s for s, i in manifest['splits'].items() if i['kind'] == 'gallery']})"
        )
    out = Path(out) if out is not None else runtime.artifacts.dir / INDEX_DIR
    settings = index_settings(runtime, data, manifest, split, dtype)
    progress = read_progress(out, settings)
    if progress is None:
        if out.exists():
            if any(out.iterdir()) and not (
                (out / "index.json").exists() or (out / PROGRESS_FILE).exists()
            ):
                raise ArtifactError(
                    f"{out}: exists and is not a gallery index; pass another --out or remove it"
                )
            shutil.rmtree(out)
        out.mkdir(parents=True)
        progress = {"settings": settings, "rows": 0, "images_bytes": 0, "meta_bytes": 0}
    elif progress.get("complete"):
        log.info("%s: index already complete (%d rows)", out, settings["count"])
        return json.loads((out / "index.json").read_text())
    else:
        log.info("%s: resuming at row %d of %d", out, progress["rows"], settings["count"])
    files = IndexFiles(out, settings, fresh=progress["rows"] == 0)
    try:
        files.truncate(progress["images_bytes"], progress["meta_bytes"])
        write_json_atomic(out / PROGRESS_FILE, progress)
        _fill(files, progress, runtime, data, split, batch_size, loader_workers, out, show_progress)
    finally:
        files.close()
    if progress["rows"] != settings["count"]:
        raise ManifestError(
            f"{data}: split {split!r} yielded {progress['rows']} images, "
            f"the manifest says {settings['count']}"
        )
    ids = [json.loads(line)["id"] for line in (out / "meta.jsonl").read_text().splitlines()]
    write_json_atomic(out / "ids.json", ids)
    info = {k: v for k, v in settings.items() if k != "data"}
    info["complete"] = True
    write_json_atomic(out / "index.json", info)
    (out / PROGRESS_FILE).unlink()
    return info


def _fill(
    files: IndexFiles,
    progress: dict[str, Any],
    runtime: GraphRuntime,
    data: Path,
    split: str,
    batch_size: int,
    loader_workers: int,
    out: Path,
    show_progress: bool,
) -> None:
    """Encode and write every row after ``progress["rows"]``, recording each batch."""
    done = progress["rows"]
    count = progress["settings"]["count"]
    dtype = np.dtype(progress["settings"]["dtype"])
    start = 0
    with tqdm(
        total=count, initial=done, unit="img", desc="gallery index", disable=not show_progress
    ) as bar:
        for ids, images, rows in gallery_batches(
            data, split, batch_size, runtime.artifacts.preprocess, loader_workers
        ):
            end = start + len(ids)
            if end > count:
                raise ArtifactError(
                    f"{data}: split {split!r} holds more than the manifest's {count} images"
                )
            if end <= done:  # finished before an interruption
                start = end
                continue
            skip = done - start if done > start else 0
            images, rows = images[skip:], rows[skip:]
            reprs = runtime.encode_image(images)
            targets = runtime.embed_target(reprs)
            files.write_rows(
                start + skip,
                targets.cpu().numpy().astype(dtype),
                {n: r.cpu().numpy().astype(dtype) for n, r in reprs.items()},
                [r.pop("bytes") for r in rows],
                rows,
            )
            progress.update(
                rows=end, images_bytes=files.images.tell(), meta_bytes=files.meta.tell()
            )
            write_json_atomic(out / PROGRESS_FILE, progress)
            bar.update(end - max(start, done))
            done, start = end, end


def read_progress(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The state of an earlier build with the same settings, or None to start over.

    A finished index counts as ``{"complete": True}``; an unfinished one returns its
    ``progress.json``.
    """
    info_file, progress_file = out / "index.json", out / PROGRESS_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        same = {k: v for k, v in settings.items() if k != "data"} == {
            k: v for k, v in info.items() if k != "complete"
        }
        if info.get("complete") and same:
            return {"complete": True}
    if progress_file.is_file():
        try:
            progress = json.loads(progress_file.read_text())
        except json.JSONDecodeError:
            progress = None
        if progress and progress.get("settings") == settings and progress.get("rows", 0) > 0:
            return progress
    if out.exists():
        log.warning("%s: existing index was built with other settings; starting over", out)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.index", description="embed every gallery image into ART_DIR/index"
    )
    parser.add_argument("--artifacts", required=True, metavar="ART_DIR")
    parser.add_argument(
        "--data",
        default=None,
        metavar="SHARDS",
        help="shard dataset directory to index (leave out to only --shards / --faiss a "
        "built index)",
    )
    parser.add_argument("--split", default="gallery")
    parser.add_argument("--out", default=None, help="index directory (default ART_DIR/index)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)"
    )
    parser.add_argument(
        "--loader-workers",
        dest="workers",
        type=int,
        default=0,
        help="image decoding processes of the loader",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="split the index into N shards of contiguous rows (index/shards.json), one per "
        "searcher; also re-splits a built index",
    )
    parser.add_argument(
        "--faiss",
        action="store_true",
        help="also build the approximate faiss layout (IVF-PQ, per shard) and measure its "
        "recall@10 against exact search",
    )
    parser.add_argument("--faiss-nlist", type=int, default=None, help="IVF cells (default ~sqrt N)")
    parser.add_argument("--faiss-m", type=int, default=64, help="PQ sub-quantisers (divides D)")
    parser.add_argument(
        "--faiss-candidates", type=int, default=800, help="candidates re-scored per query"
    )
    args = parser.parse_args(argv)
    if args.shards is not None and args.shards < 1:
        parser.error(f"--shards must be >= 1, got {args.shards}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.checkpoint import CheckpointError
    from shards.manifest import ManifestError

    out = Path(args.out or Path(args.artifacts) / INDEX_DIR)
    try:
        if args.data is not None:
            info = build_index(
                args.artifacts,
                args.data,
                split=args.split,
                out=args.out,
                dtype=args.dtype,
                batch_size=args.batch_size,
                backend=args.backend,
                threads=args.threads,
                loader_workers=args.workers,
            )
            print(
                f"{out}: {info['count']} images of {info['dataset']}/{info['split']}, "
                f"embed_dim {info['embed_dim']}, {info['dtype']}"
            )
        elif args.shards is None and not args.faiss:
            print("error: give --data to build an index, or --shards / --faiss", file=sys.stderr)
            return 2
        recorded = add_layouts(out, args)
    except (ArtifactError, ManifestError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if "shards" in recorded:
        print(f"{out}: {len(recorded['shards'])} shards: {recorded['shards']}")
    for i, faiss_info in enumerate(recorded.get("faiss", [])):
        print(
            f"{out}: faiss IVF{faiss_info['nlist']},PQ{faiss_info['m']} (shard {i}): "
            f"recall@{faiss_info['k']} {faiss_info['recall_at_k']:.4f} against exact search"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
