"""ONNX graphs -> TensorRT engines (TensorRT 10 and 11 Python API), checked against ONNX Runtime.

    python -m export.trt --artifacts ART_DIR [--fp16] [--max-batch 64] [--opt-batch 8]
                         [--max-text-len T] [--workspace-gb 4] [--graphs image_encoder ...]

One engine per graph of ``ART_DIR/artifacts.json``, written to ``ART_DIR/engines/`` as
``<graph>.trt<TRT version>.sm<compute capability>.<sha256[:12] of the parsed ONNX>.engine``
(``.fp16.engine`` for FP16 builds), with one optimisation profile: batch 1 / opt / max and
text length 1 / min(16, T) / T. ``engines/timing.cache`` persists kernel timings across
builds; ``engines/engines.json`` lists the engines and their parity figures.

Precision. TensorRT 10 builds weakly typed networks: FP16 is the builder flag. TensorRT 11
only builds strongly typed networks (the flag is gone), so ``--fp16`` first converts the ONNX
graph to mixed precision (``export.fp16``: float16 inside, float32 inputs and outputs).
FP32 builds clear the TF32 flag so that engines match ONNX Runtime to 1e-3.

Without TensorRT the command exits with code 3 and says how to install it; bad artifacts
exit with code 2; an engine that disagrees with ONNX Runtime is not written (exit 1).
This module builds engines; ``export.runtime`` runs them (the parity check too).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.artifacts import ArtifactError, load_artifacts, write_json_atomic
from export.engines import (
    ENGINE_DIR,
    ENGINES_FILE,
    EXIT_NO_TENSORRT,
    TIMING_CACHE_FILE,
    EngineBuildError,
    TensorRTUnavailable,
    cuda_compute_capability,
    engine_file_name,
    import_tensorrt,
    read_engine_listing,
    record_engine,
    trt_major,
)
from export.parity import (
    FP16_MIN_COSINE,
    TRT_FP16_TOLERANCE,
    TRT_FP32_TOLERANCE,
    ParityError,
    check,
    compare_outputs,
    merge,
    random_inputs,
)
from export.runtime.tensorrt_engines import EngineRunner

Arrays = dict[str, np.ndarray]

log = logging.getLogger(__name__)


# -- naming and profiles --------------------------------------------------------------------------
def onnx_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def profile_shapes(
    graph_info: dict[str, Any], max_batch: int, opt_batch: int, max_text_len: int
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input name: (min, opt, max) shapes}`` for one optimisation profile.

    ``batch`` dims range over 1..max_batch (opt ``opt_batch``), ``length`` dims over
    1..max_text_len (opt min(16, max_text_len)); fixed dims stay as artifacts.json gives them.
    """
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
    if max_text_len < 1:
        raise ValueError(f"max text length must be >= 1, got {max_text_len}")
    ranges = {
        "batch": (1, opt_batch, max_batch),
        "length": (1, min(16, max_text_len), max_text_len),
    }
    shapes = {}
    for name, shape in graph_info["inputs"].items():
        shapes[name] = tuple(
            tuple(ranges[d][i] if isinstance(d, str) else int(d) for d in shape) for i in range(3)
        )
    return shapes


# -- building ------------------------------------------------------------------------------------
def build_engine(
    trt,
    onnx_path: Path,
    graph_info: dict[str, Any],
    shapes: dict[str, tuple[tuple[int, ...], ...]],
    *,
    fp16: bool,
    workspace_gb: float,
    timing_cache: bytes,
    logger=None,
) -> tuple[bytes, bytes]:
    """Parse ``onnx_path`` and build a serialized engine; returns ``(engine, timing cache)``.

    ``fp16`` on TensorRT 10 sets the FP16 builder flag; on TensorRT 11 the caller passes an
    ONNX graph already converted to mixed precision (networks are strongly typed there).
    """
    logger = logger or trt.Logger(trt.Logger.WARNING)
    major = trt_major(trt)
    builder = trt.Builder(logger)
    if major >= 11:
        flags = 0  # strongly typed is the only mode; EXPLICIT_BATCH no longer exists
    else:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(graph_info["inputs"]):
        raise ArtifactError(
            f"{onnx_path}: network inputs {sorted(inputs)}, artifacts.json "
            f"expects {sorted(graph_info['inputs'])}"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and major < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    if not fp16 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls miss the 1e-3 fp32 parity
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)

    profile = builder.create_optimization_profile()
    for name, (smallest, opt, largest) in shapes.items():
        profile.set_shape(name, smallest, opt, largest)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)"
        )
    new_cache = config.get_timing_cache().serialize()
    return bytes(serialized), bytes(new_cache)


# -- parity ---------------------------------------------------------------------------------------
def parity_cases(max_batch: int, max_text_len: int) -> list[tuple[int, int]]:
    """(batch, text length) pairs an engine is checked at: profile edges and a middle point."""
    batches = sorted({1, min(3, max_batch), max_batch})
    lengths = sorted({1, min(7, max_text_len), max_text_len})
    return [(b, t) for b in batches for t in lengths]


def check_engine_parity(
    run_engine: Callable[[Arrays], Arrays],
    run_reference: Callable[[Arrays], Arrays],
    graph_info: dict[str, Any],
    cases: list[tuple[int, int]],
    vocab_size: int,
    fp16: bool,
    what: str,
    seed: int = 0,
) -> dict[str, float]:
    """Run both on the same random inputs for every case; raise ``ParityError`` past the
    tolerance (1e-3 fp32; 2e-2 and row cosine >= 0.999 fp16). Returns the worst case."""
    rng = np.random.default_rng(seed)
    uses_length = any("length" in shape for shape in graph_info["inputs"].values())
    stats = []
    for batch, length in cases:
        if not uses_length and length != cases[0][1]:
            continue
        feeds = random_inputs(graph_info, batch, length, vocab_size, rng)
        stats.append(compare_outputs(run_reference(feeds), run_engine(feeds)))
    worst = merge(stats)
    if fp16:
        check(worst, TRT_FP16_TOLERANCE, what, min_cosine=FP16_MIN_COSINE)
    else:
        check(worst, TRT_FP32_TOLERANCE, what)
    return worst


def ort_reference(onnx_path: Path) -> Callable[[Arrays], Arrays]:
    """The fp32 graph in ONNX Runtime on CPU, as a feeds -> outputs callable."""
    from export.runtime.onnxruntime_graphs import ort_session

    session = ort_session(onnx_path)
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


# -- command -------------------------------------------------------------------------------------
def build_all(
    art_dir: str | Path,
    *,
    fp16: bool = False,
    max_batch: int = 64,
    opt_batch: int = 8,
    max_text_len: int | None = None,
    workspace_gb: float = 4.0,
    graphs: list[str] | None = None,
    trt=None,
) -> list[dict[str, Any]]:
    """Build, check and write one engine per graph; returns the engines.json entries."""
    trt = trt or import_tensorrt()
    arts = load_artifacts(art_dir)
    art_dir = arts.dir
    cc = cuda_compute_capability()
    max_text_len = max_text_len or arts.max_text_len
    opt_batch = min(opt_batch, max_batch)
    engine_dir = art_dir / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    cache_path = engine_dir / TIMING_CACHE_FILE
    timing_cache = cache_path.read_bytes() if cache_path.is_file() else b""
    vocab_size = len(arts.vocab)
    logger = trt.Logger(trt.Logger.WARNING)
    unknown = sorted(set(graphs or []) - set(arts.graphs))
    if unknown:
        raise ArtifactError(
            f"{art_dir / 'artifacts.json'}: no graph(s) {unknown}; it has {list(arts.graphs)}"
        )
    entries = []
    for graph in graphs or list(arts.graphs):
        info = arts.info["graphs"][graph]
        fp32_onnx = arts.graph(graph).file
        parsed = fp32_onnx
        if fp16 and trt_major(trt) >= 11:
            from export.fp16 import convert_to_fp16

            parsed = convert_to_fp16(fp32_onnx, engine_dir / f"{graph}.fp16.onnx")
        sha = onnx_sha256(parsed)
        name = engine_file_name(graph, trt.__version__, cc, sha, fp16)
        shapes = profile_shapes(info, max_batch, opt_batch, max_text_len)
        started = time.perf_counter()
        engine, timing_cache = build_engine(
            trt,
            parsed,
            info,
            shapes,
            fp16=fp16,
            workspace_gb=workspace_gb,
            timing_cache=timing_cache,
            logger=logger,
        )
        build_s = time.perf_counter() - started
        write_bytes_atomic(cache_path, timing_cache)
        runner = EngineRunner(trt, engine, name=name, logger=logger)
        stats = check_engine_parity(
            numpy_io(runner),
            ort_reference(fp32_onnx),
            info,
            parity_cases(max_batch, max_text_len),
            vocab_size,
            fp16,
            what=f"{name} vs ONNX Runtime",
        )
        write_bytes_atomic(engine_dir / name, engine)
        entry = {
            "graph": graph,
            "file": name,
            "tensorrt": trt.__version__,
            "compute_capability": list(cc),
            "precision": "fp16" if fp16 else "fp32",
            "onnx": parsed.name,
            "onnx_sha256": sha,
            "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
            "workspace_gb": workspace_gb,
            "build_seconds": round(build_s, 2),
            "bytes": len(engine),
            "parity": stats,
        }
        listing = record_engine(read_engine_listing(art_dir), entry)
        write_json_atomic(engine_dir / ENGINES_FILE, listing)
        entries.append(entry)
        log.info("%s: built in %.1f s, parity %s", name, build_s, stats)
    return entries


def numpy_io(runner: EngineRunner) -> Callable[[Arrays], Arrays]:
    """The runtime's engine runner (torch CUDA tensors) as numpy feeds -> numpy outputs,
    for the parity check against ONNX Runtime."""
    import torch

    def run(feeds: Arrays) -> Arrays:
        outputs = runner({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feeds.items()})
        if runner.device.type == "cuda":
            torch.cuda.current_stream(runner.device).synchronize()
        return {n: t.float().cpu().numpy() for n, t in outputs.items()}

    return run


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.trt", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--artifacts",
        required=True,
        metavar="ART_DIR",
        help="artifact directory written by `python -m export.onnx` (its ONNX graphs)",
    )
    parser.add_argument("--fp16", action="store_true", help="build FP16 engines")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument(
        "--opt-batch",
        type=int,
        default=8,
        help="batch size TensorRT tunes kernels for (clamped to --max-batch)",
    )
    parser.add_argument(
        "--max-text-len",
        type=int,
        default=None,
        help="longest text (tokens); default: artifacts.json tokenizer.max_text_len",
    )
    parser.add_argument("--workspace-gb", type=float, default=4.0)
    parser.add_argument("--graphs", nargs="+", default=None, help="only these graphs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        entries = build_all(
            args.artifacts,
            fp16=args.fp16,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            max_text_len=args.max_text_len,
            workspace_gb=args.workspace_gb,
            graphs=args.graphs,
        )
    except TensorRTUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    except (ArtifactError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ParityError, EngineBuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'graph':14s} {'engine':64s} {'build s':>8s} {'max|diff|':>10s} {'min cos':>9s}")
    for e in entries:
        print(
            f"{e['graph']:14s} {e['file']:64s} {e['build_seconds']:8.1f} "
            f"{e['parity']['max_abs_diff']:10.2e} {e['parity']['min_cosine']:9.6f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
