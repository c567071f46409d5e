"""Int8 image encoder for CPU serving: static quantization of the exported image encoder,
calibrated on catalogue images and accepted only if it ranks like float32.

    python -m export.int8 --artifacts ART_DIR --data DATA_DIR [--split gallery]
        [--calibration-images 256] [--parity-images 64] [--eval-set NAME]
        [--max-recall-drop 1.0] [--no-recall] [--threads N] [--overwrite]

Why: on a CPU the image encoder is ~90 % of a query's time, and ONNX Runtime already
runs it near the float32 FMA peak of the cores (docs/export.md); int8 kernels (AVX-512
VNNI, AVX2) do several times the multiply-adds per cycle. The text encoder (an LSTM) and
the composer are a few percent of a query and stay float32.

How: ONNX Runtime's ``quantize_static`` in QDQ form, weights int8 per output channel,
activations uint8 per tensor with MinMax ranges over ``--calibration-images`` images of
the split (its first, in shard order); the graph keeps float32 inputs and outputs, so its
interface is the one artifacts.json declares. Then two checks against the float32
graphs: the cosine between int8 and float32 target embeddings of ``--parity-images``
further images, and (unless ``--no-recall``) the dataset's recalls through both, where
no recall may drop by more than ``--max-recall-drop`` points (exit 1, nothing written).

Writes ``ART_DIR/int8/image_encoder.onnx`` and ``int8.json`` (``export.int8_listing``)
atomically; serve them with ``python -m serve --backend onnxruntime --precision int8``
or ``open_runtime(ART_DIR, "onnxruntime", precision="int8")``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.artifacts import (
    ArtifactError,
    Artifacts,
    load_artifacts,
    staging_dir,
    write_json_atomic,
)
from export.int8_listing import INT8_DIR, INT8_FILE, INT8_FORMAT
from pipeline.checkpoint import file_sha256

log = logging.getLogger(__name__)
QUANTIZED_GRAPHS = ("image_encoder",)


class RecallDrop(RuntimeError):
    """The int8 graphs rank the dataset worse than float32 by more than allowed."""


def read_images(
    artifacts: Artifacts, data: str | Path, split: str, count: int, purpose: str = ""
) -> np.ndarray:
    """The first ``count`` images of ``split`` (shard order), preprocessed as the export
    does: (count, 3, S, S) float32. Fewer images than asked is an error."""
    from pipeline.gallery_data import gallery_loader

    pre = artifacts.preprocess
    batches, have = [], 0
    for _, images, _ in gallery_loader(
        data,
        split,
        batch_size=64,
        image_size=artifacts.image_size,
        mean=pre["mean"],
        std=pre["std"],
    ):
        batches.append(images[: count - have].numpy())
        have += len(batches[-1])
        if have >= count:
            break
    if have < count:
        raise ArtifactError(
            f"{data}: split {split!r} has {have} images, {count} are needed{purpose}"
        )
    return np.concatenate(batches)


def quantize_graph(src: Path, dst: Path, calibration: Path, batch_size: int) -> None:
    """Quantize ONNX file ``src`` into ``dst`` with the images of ``calibration`` (.npy).

    Runs in a process of its own: ONNX Runtime's calibration makes sessions with thread
    pools of their own, which a process whose sessions share the global pool
    (``ort_session``) refuses.
    """
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        pool.submit(_quantize, str(src), str(dst), str(calibration), batch_size).result()


def _quantize(src: str, dst: str, calibration: str, batch_size: int) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every tensor it copies
    images = np.load(calibration, mmap_mode="r")
    input_name = onnx.load(src, load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(images):
                return None
            batch = np.ascontiguousarray(images[self.start : self.start + batch_size])
            self.start += batch_size
            return {input_name: batch}

    prepared = str(Path(dst).with_suffix(".prepared.onnx"))
    quant_pre_process(src, prepared)  # shape inference + graph optimisations first
    quantize_static(
        prepared,
        dst,
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    Path(prepared).unlink()


def target_cosines(fp32, int8, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """(N,) cosine between the two runtimes' target embeddings of ``images``."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size])
        want = fp32.embed_target(fp32.encode_image(batch))
        got = int8.embed_target(int8.encode_image(batch))
        out.append((want * got).sum(dim=1))  # unit rows
    return torch.cat(out)


def compare_recalls(fp32, int8, data: str | Path, eval_set: str | None) -> dict[str, Any]:
    """The dataset's recalls through both runtimes (``pipeline.evaluate``)."""
    from export.runtime.model_api import RuntimeModule
    from export.verify import evaluate_exported, recall_keys

    want = evaluate_exported(RuntimeModule(fp32), fp32.artifacts, data, eval_set=eval_set)
    got = evaluate_exported(RuntimeModule(int8), fp32.artifacts, data, eval_set=eval_set)
    keys = [k for k in recall_keys(want) if k.startswith("R")]
    return {
        "eval": want.get("eval"),
        "fp32": {k: want[k] for k in keys},
        "int8": {k: got[k] for k in keys},
        "max_drop": max((want[k] - got[k] for k in keys), default=0.0),
    }


def build_int8(
    artifacts: Artifacts | str | Path,
    calibration: np.ndarray,
    parity: np.ndarray,
    *,
    data: str | Path | None = None,
    eval_set: str | None = None,
    max_recall_drop: float = 1.0,
    batch_size: int = 32,
    threads: int = 0,
    overwrite: bool = False,
    calibration_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize the image encoder of ``artifacts`` (an ART_DIR or its loaded
    ``Artifacts``) on ``calibration`` images (N, 3, S, S),
    check it (``parity`` images; recalls on ``data`` when given) and write ``int8/``.
    Returns the listing. ``RecallDrop`` when a recall drops by more than allowed."""
    from export.runtime.onnxruntime_graphs import OnnxRuntimeGraphs

    arts = artifacts if isinstance(artifacts, Artifacts) else load_artifacts(artifacts)
    side = arts.image_size
    for name, images in (("calibration", calibration), ("parity", parity)):
        if images.ndim != 4 or images.shape[1:] != (3, side, side) or len(images) == 0:
            raise ArtifactError(f"{name} images must be (N, 3, {side}, {side}), got {images.shape}")
    with staging_dir(arts.dir / INT8_DIR, overwrite=overwrite) as tmp:
        np.save(tmp / "calibration.npy", np.ascontiguousarray(calibration, dtype=np.float32))
        files = {}
        for graph in QUANTIZED_GRAPHS:
            files[graph] = tmp / f"{graph}.onnx"
            log.info("quantizing %s on %d calibration images", graph, len(calibration))
            quantize_graph(
                arts.graph(graph).file, files[graph], tmp / "calibration.npy", batch_size
            )
        (tmp / "calibration.npy").unlink()
        fp32 = OnnxRuntimeGraphs(arts, threads=threads)
        int8 = OnnxRuntimeGraphs(arts, threads=threads, graph_files=files)
        cosines = target_cosines(fp32, int8, parity)
        listing: dict[str, Any] = {
            "format": INT8_FORMAT,
            "graphs": {
                graph: {
                    "file": f"{INT8_DIR}/{file.name}",
                    "sha256": file_sha256(file),
                    "source_sha256": arts.graph(graph).sha256
                    or file_sha256(arts.graph(graph).file),
                }
                for graph, file in files.items()
            },
            "quantization": "QDQ, int8 weights per channel, uint8 activations per tensor (MinMax)",
            "calibration": {"images": len(calibration), **(calibration_source or {})},
            "parity": {
                "images": len(parity),
                "target_cosine_min": float(cosines.min()),
                "target_cosine_mean": float(cosines.mean()),
            },
        }
        log.info(
            "int8 vs float32 target embeddings over %d images: cosine mean %.5f, min %.5f",
            len(parity),
            cosines.mean(),
            cosines.min(),
        )
        if data is not None:
            recalls = compare_recalls(fp32, int8, data, eval_set)
            listing["recall"] = {**recalls, "max_allowed_drop": max_recall_drop}
            log.info("recalls float32 %s | int8 %s", recalls["fp32"], recalls["int8"])
            if recalls["max_drop"] > max_recall_drop:
                raise RecallDrop(
                    f"int8 drops a recall of {data} by {recalls['max_drop']:.2f} points "
                    f"(allowed {max_recall_drop}): float32 {recalls['fp32']}, int8 "
                    f"{recalls['int8']}; nothing written"
                )
        write_json_atomic(tmp / INT8_FILE, listing)
    return listing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.int8", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--artifacts", required=True, metavar="ART_DIR", help="written by export.onnx"
    )
    parser.add_argument(
        "--data", required=True, help="shard dataset: calibration images and recalls"
    )
    parser.add_argument("--split", default="gallery", help="split the images come from")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--parity-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="calibration batch")
    parser.add_argument("--eval-set", default=None, help="evaluation set (default: the first)")
    parser.add_argument(
        "--max-recall-drop", type=float, default=1.0, help="largest allowed drop of any R@K, points"
    )
    parser.add_argument("--no-recall", action="store_true", help="skip the recall comparison")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ART_DIR/int8")
    args = parser.parse_args(argv)
    for flag in ("calibration_images", "parity_images", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        arts = load_artifacts(args.artifacts)
        count = args.calibration_images + args.parity_images
        purpose = (
            f" (--calibration-images {args.calibration_images} + "
            f"--parity-images {args.parity_images})"
        )
        images = read_images(arts, args.data, args.split, count, purpose)
        listing = build_int8(
            arts,
            images[: args.calibration_images],
            images[args.calibration_images :],
            data=None if args.no_recall else args.data,
            eval_set=args.eval_set,
            max_recall_drop=args.max_recall_drop,
            batch_size=args.batch_size,
            threads=args.threads,
            overwrite=args.overwrite,
            calibration_source={"data": str(args.data), "split": args.split},
        )
    except RecallDrop as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ArtifactError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.artifacts) / INT8_DIR / INT8_FILE}: {listing['parity']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
