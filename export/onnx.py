"""Checkpoint -> ONNX artifact directory, checked against PyTorch in ONNX Runtime.

    python -m export.onnx --checkpoint CKPT --out ART_DIR [--expect-model NAME] [--overwrite]
                          [--image-size S] [--max-text-len 64] [--verify-recall DATA]
                          [--eval-set NAME] [--threads N]

Writes one ONNX graph per serving step (``pipeline.models.export_wrappers.graph_modules``:
image encoder, text encoder, composer, target head and, for CCNet, the correction
network) at opset 17 with a dynamic ``batch`` axis and a dynamic text ``length`` axis,
plus ``vocab.json``, a copy of the checkpoint and ``artifacts.json`` (export.artifacts).

Every graph must pass ``onnx.checker`` and match PyTorch in ONNX Runtime (fp32, max abs
diff <= 1e-4) over batch sizes 1, 3, 8 and text lengths 1, 4, 11; the figures go into
``artifacts.json["parity"]``. ``--verify-recall DATA`` evaluates the shard dataset DATA
with the checkpoint and with the ONNX graphs and requires the same R@K.

Everything is written into ``ART_DIR.partial-<pid>`` and renamed at the end: a failed
export leaves nothing behind. Exit codes: 0 ok, 1 parity or recall mismatch, 2 bad input
(wrong/corrupt checkpoint, missing file, bad dataset).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import onnx
import torch

from export.artifacts import (
    ARTIFACTS_FILE,
    ARTIFACTS_FORMAT,
    CHECKPOINT_COPY,
    VOCAB_FILE,
    ArtifactError,
    staging_dir,
    write_json_atomic,
)
from export.parity import ORT_TOLERANCE, ParityError, check, compare_outputs, merge
from pipeline.checkpoint import CheckpointError, checkpoint_file, file_sha256, load_model
from pipeline.images import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from pipeline.models.export_wrappers import ONNX_OPSET as OPSET
from pipeline.models.export_wrappers import GraphModule, export_graph, graph_modules
from pipeline.vocab import Vocabulary

log = logging.getLogger(__name__)

PARITY_BATCHES = (1, 3, 8)
PARITY_LENGTHS = (1, 4, 11)
DEFAULT_MAX_TEXT_LEN = 64
_TORCH_DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.float16: "float16"}


def symbolic_shape(tensor: torch.Tensor, axes: dict[int, str]) -> list:
    return [axes.get(i, int(s)) for i, s in enumerate(tensor.shape)]


def export_graph_file(graph: GraphModule, path: Path, opset: int = OPSET) -> dict[str, Any]:
    """Export one graph to ``path``; returns its artifacts.json entry (file, shapes, dtypes).

    Uses the TorchScript exporter: it emits opset 17 directly (the dynamo exporter starts
    at opset 18 and cannot convert every graph down) and handles nn.LSTM with dynamic axes.
    Output shapes in the file are rewritten to the traced ones (fixed sizes, symbolic
    batch/length), since the exporter leaves some as generated names.
    """
    inputs = graph.example_inputs(2, 4)
    with torch.no_grad():
        outputs = graph.module.eval()(*inputs)  # traced shapes and dtypes for artifacts.json
    export_graph(graph, path, batch=2, text_len=4, opset=opset)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    entry = {"file": path.name, "inputs": {}, "outputs": {}, "dtypes": {}}
    for name, tensor in zip(graph.input_names, inputs):
        entry["inputs"][name] = symbolic_shape(tensor, graph.dynamic_axes.get(name, {}))
        entry["dtypes"][name] = _TORCH_DTYPES[tensor.dtype]
    for name, tensor in zip(graph.output_names, outputs):
        entry["outputs"][name] = symbolic_shape(tensor, graph.dynamic_axes.get(name, {}))
        entry["dtypes"][name] = _TORCH_DTYPES[tensor.dtype]
    model = onnx.load(str(path))
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, entry["outputs"][value.name]):
            dim.Clear()
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want
    declared = [i.name for i in model.graph.input]
    if declared != graph.input_names:
        raise ArtifactError(
            f"{path}: exported inputs {declared}, expected {graph.input_names} "
            "(the graph ignores an input it was declared to read)"
        )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    entry["sha256"] = file_sha256(path)  # checked before a backend loads the graph
    return entry


def check_graph_parity(
    graph: GraphModule,
    path: Path,
    threads: int = 1,
    batches: tuple[int, ...] = PARITY_BATCHES,
    lengths: tuple[int, ...] = PARITY_LENGTHS,
) -> dict[str, float]:
    """Torch vs ONNX Runtime on the graph's example inputs over ``batches`` x ``lengths``
    (text lengths only for graphs with a text axis); raise ``ParityError`` past 1e-4.
    Returns the worst case."""
    from export.runtime.onnxruntime_graphs import ort_session

    session = ort_session(path, threads=threads)
    uses_length = any("length" in axes.values() for axes in graph.dynamic_axes.values())
    lengths = lengths if uses_length else lengths[:1]
    stats = []
    for batch in batches:
        for length in lengths:
            inputs = graph.example_inputs(batch, length)
            with torch.no_grad():
                expected = graph.module(*inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            feeds = {n: t.numpy() for n, t in zip(graph.input_names, inputs)}
            got = session.run(graph.output_names, feeds)
            stats.append(
                compare_outputs(
                    {n: t.numpy() for n, t in zip(graph.output_names, expected)},
                    dict(zip(graph.output_names, got)),
                )
            )
    worst = merge(stats)
    check(worst, ORT_TOLERANCE, f"{path.name}: ONNX Runtime vs PyTorch")
    return worst


def image_settings(payload: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """Preprocessing of the checkpoint's run config (``image: {size, mean, std}``)."""
    image_cfg = (payload.get("config") or {}).get("image") or {}
    size = image_size or image_cfg.get("size")
    if not size:
        raise CheckpointError("checkpoint config has no image.size; pass --image-size")
    preprocess = ImagePreprocess(
        int(size), image_cfg.get("mean", IMAGENET_MEAN), image_cfg.get("std", IMAGENET_STD)
    )
    return {"image_size": int(size), **preprocess.to_dict()}


def tokenizer_settings(vocab: Vocabulary, max_text_len: int) -> dict[str, Any]:
    rules = {k: v for k, v in vocab.to_dict().items() if k != "words"}
    return {
        **rules,
        "max_text_len": int(max_text_len),
        "vocab_file": VOCAB_FILE,
        "vocab_size": len(vocab),
    }


def export_artifacts(
    checkpoint: str | Path,
    out: str | Path,
    *,
    expect_model: str | None = None,
    overwrite: bool = False,
    image_size: int | None = None,
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    verify_recall: str | None = None,
    eval_set: str | None = None,
    threads: int = 1,
    parity_batches: tuple[int, ...] = PARITY_BATCHES,
    parity_lengths: tuple[int, ...] = PARITY_LENGTHS,
) -> dict[str, Any]:
    """Write ART_DIR ``out`` from ``checkpoint``; returns the artifacts.json dict.

    ``threads`` caps ONNX Runtime's and torch's intra-op threads (0: library defaults).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    source = checkpoint_file(checkpoint)
    model, vocab, payload = load_model(source, expect_model=expect_model)
    preprocess = image_settings(payload, image_size)
    graphs = {name: g for name, g in graph_modules(model, preprocess["image_size"]).items()}
    with staging_dir(out, overwrite=overwrite) as tmp:
        entries, parity = {}, {}
        for name, graph in graphs.items():
            path = tmp / f"{name}.onnx"
            entries[name] = export_graph_file(graph, path)
            parity[name] = check_graph_parity(
                graph, path, threads=threads, batches=parity_batches, lengths=parity_lengths
            )
            log.info(
                "%s: max abs diff %.2e, min cosine %.8f",
                name,
                parity[name]["max_abs_diff"],
                parity[name]["min_cosine"],
            )
        shutil.copyfile(source, tmp / CHECKPOINT_COPY)
        vocab.save(tmp / VOCAB_FILE)
        arts = {
            "format": ARTIFACTS_FORMAT,
            "model_name": payload["model_name"],
            "embed_dim": int(model.embed_dim),
            "image_repr_names": list(model.image_repr_names),
            "text_repr_names": list(model.text_repr_names),
            "has_correction": bool(model.has_correction),
            "opset": OPSET,
            "graphs": entries,
            "preprocess": preprocess,
            "tokenizer": tokenizer_settings(vocab, max_text_len),
            "checkpoint": {
                "file": CHECKPOINT_COPY,
                "sha256": file_sha256(source),
                "source": str(source.resolve()),
                "step": payload.get("step", 0),
            },
            "parity": parity,
        }
        scale = getattr(model, "loss_scale", None)
        if scale is not None:  # CCNet re-ranking's softmax scale (pipeline.evaluate)
            arts["loss_scale"] = float(scale.detach())
        write_json_atomic(tmp / ARTIFACTS_FILE, arts)
        if verify_recall is not None:
            from export.verify import verify_recall as run_verify

            arts["recall"] = run_verify(
                model,
                tmp,
                verify_recall,
                eval_set=eval_set,
                image_size=preprocess["image_size"],
                threads=threads,
            )
            write_json_atomic(tmp / ARTIFACTS_FILE, arts)
    return arts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.onnx", description="checkpoint -> ONNX artifact directory"
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or .pt file")
    parser.add_argument("--out", required=True, metavar="ART_DIR")
    parser.add_argument(
        "--expect-model",
        default=None,
        metavar="NAME",
        help="refuse a checkpoint of any other model",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ART_DIR")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side S (default: the checkpoint config's image.size)",
    )
    parser.add_argument(
        "--max-text-len",
        type=int,
        default=DEFAULT_MAX_TEXT_LEN,
        help="longest text the tokenizer keeps (tokens)",
    )
    parser.add_argument(
        "--verify-recall",
        default=None,
        metavar="DATA",
        help="shard dataset: require equal R@K from PyTorch and ONNX Runtime",
    )
    parser.add_argument("--eval-set", default=None, help="evaluation set of DATA (default: first)")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from export.verify import RecallMismatch
    from shards.manifest import ManifestError

    try:
        arts = export_artifacts(
            args.checkpoint,
            args.out,
            expect_model=args.expect_model,
            overwrite=args.overwrite,
            image_size=args.image_size,
            max_text_len=args.max_text_len,
            verify_recall=args.verify_recall,
            eval_set=args.eval_set,
            threads=args.threads,
        )
    except (CheckpointError, ArtifactError, ManifestError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ParityError, RecallMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {arts['model_name']} (embed_dim {arts['embed_dim']}, opset {OPSET})")
    print(f"{'graph':14s} {'max|diff|':>10s} {'min cosine':>12s}")
    for name, stats in arts["parity"].items():
        print(f"{name:14s} {stats['max_abs_diff']:10.2e} {stats['min_cosine']:12.8f}")
    if "recall" in arts:
        for key, value in arts["recall"]["onnxruntime"].items():
            ok = math.isclose(value, arts["recall"]["torch"][key])
            print(
                f"{key:14s} torch {arts['recall']['torch'][key]:7.2f}  "
                f"onnxruntime {value:7.2f}  {'equal' if ok else 'DIFFERENT'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
