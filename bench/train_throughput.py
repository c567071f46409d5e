"""Training throughput of one config: where the time goes (model vs data loading).

Runs the in-process training loop (``pipeline.loop.train_loop``, no Ray: this script
needs only torch) for ``--steps`` steps in up to three modes and prints a table:

* ``synthetic``: random tensors already on the device (the model, loss, backward
  and optimiser alone);
* ``shards``: the real loop reading the config's shards (decode + augment + model);
* ``loader``: the shard reader alone, no model (how fast data can be fed).

Throughput is measured between the end of the ``--warmup`` th step and the last step
(samples = steps x batch size). On a GPU it also samples utilisation through
``torch.cuda.utilization`` (pynvml) or ``nvidia-smi`` and records peak memory.

    python bench/train_throughput.py --config configs/css_tirg.yaml --data data/css-small \\
        --modes synthetic shards loader --steps 30 --out results/train_throughput.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script Python puts bench/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from pipeline.config import load_config, resolve_run_paths  # noqa: E402
from pipeline.vocab import Vocabulary  # noqa: E402

MODES = ("synthetic", "shards", "loader")


class StepClock:
    """Timestamps of every batch request: batch i+1 is asked for when step i is done."""

    def __init__(self):
        self.times: list[float] = []

    def wrap(self, batches, device: torch.device) -> Iterator[dict[str, Any]]:
        for batch in batches:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            yield batch
        self.times.append(time.perf_counter())

    def samples_per_s(self, warmup: int, batch_size: int) -> float:
        # times[k] = when step k+1 started (after step k ended); the last = loop end
        start, end = self.times[warmup], self.times[-1]
        steps = len(self.times) - 1 - warmup
        return steps * batch_size / max(end - start, 1e-9)


class GpuSampler(threading.Thread):
    """Samples GPU utilisation (%) every 0.2 s while the benchmark runs."""

    def __init__(self, device: torch.device):
        super().__init__(daemon=True)
        self.device, self.samples, self.stop = device, [], threading.Event()

    def read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no pynvml: ask nvidia-smi
            try:
                out = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=utilization.gpu",
                        "--format=csv,noheader,nounits",
                        f"--id={self.device.index or 0}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

    def run(self) -> None:
        while not self.stop.wait(0.2):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def synthetic_vocab(size: int = 1000) -> Vocabulary:
    return Vocabulary(f"w{i}" for i in range(size - 2))


def synthetic_batches(
    config: dict[str, Any], vocab: Vocabulary, device: torch.device, pool: int = 4
):
    """A source of ``pool`` fixed random batches on the device, cycled (no input cost)."""
    train, size = config["train"], config["image"]["size"]
    b, t = train["batch_size"], min(int(train["max_text_len"]), 12)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(pool):
        lengths = torch.randint(3, t + 1, (b,), generator=generator)
        tokens = torch.randint(2, len(vocab), (b, t), generator=generator)
        tokens[torch.arange(t)[None, :] >= lengths[:, None]] = 0
        batches.append(
            {
                "ref_images": torch.randn(b, 3, size, size, generator=generator).to(device),
                "target_images": torch.randn(b, 3, size, size, generator=generator).to(device),
                "tokens": tokens.to(device),
                "lengths": lengths.to(device),
            }
        )

    def epoch_batches(epoch: int, skip: int = 0):
        for i in range(skip, train["batches_per_epoch"]):
            yield batches[i % pool]

    return epoch_batches


def bench_config(args: argparse.Namespace, mode: str, scratch: Path) -> dict[str, Any]:
    overrides = list(args.overrides) + [
        f"train.steps={args.steps}",
        "train.workers=0",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "eval.at_end=false",
        f"out={scratch / mode}",
        f"train.log_every={max(args.steps // 5, 1)}",
    ]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.data:
        overrides.append(f"data={args.data}")
    if mode == "synthetic":
        overrides += [f"train.batches_per_epoch={args.steps}"]
        if not args.data:
            overrides.append(f"data={scratch / 'no-data'}")
    return resolve_run_paths(load_config(args.config, overrides))


def run_mode(args: argparse.Namespace, mode: str, scratch: Path) -> dict[str, Any]:
    from pipeline.loop import local_context, shard_batches, train_loop

    config = bench_config(args, mode, scratch)
    context = local_context(config)
    device, clock = context.device, StepClock()
    if mode == "synthetic":
        vocab = synthetic_vocab()
        source = synthetic_batches(config, vocab, device)
    else:
        from pipeline.shard_groups import build_vocabulary, default_batches_per_epoch

        vocab = build_vocabulary(config["data"])
        per_epoch = config["train"]["batches_per_epoch"] or default_batches_per_epoch(
            config["data"], config["train"]["batch_size"], 1
        )
        source = shard_batches(config, vocab, context, per_epoch)

    def timed(epoch: int, skip: int = 0):
        return clock.wrap(source(epoch, skip), device)

    sampler = GpuSampler(device) if device.type == "cuda" else None
    if sampler:
        torch.cuda.reset_peak_memory_stats(device)
        sampler.start()
    start = time.perf_counter()
    if mode == "loader":
        steps = 0
        while steps < args.steps:
            for _ in timed(steps // per_epoch):
                steps += 1
                if steps >= args.steps:
                    break
    else:
        train_loop(config, context=context, vocab=vocab, batch_source=timed)
    wall = time.perf_counter() - start
    if sampler:
        sampler.stop.set()
        sampler.join()
    batch = config["train"]["batch_size"]
    result = {
        "mode": mode,
        "steps": args.steps,
        "batch_size": batch,
        "image_size": config["image"]["size"],
        "model": config["model"]["name"],
        "backbone": config["model"].get("image_backbone"),
        "wall_s": round(wall, 2),
        "samples_per_s": round(clock.samples_per_s(args.warmup, batch), 2),
        "step_ms": round(1000 * batch / clock.samples_per_s(args.warmup, batch), 1),
    }
    if sampler:
        result["gpu_util_mean_pct"] = sampler.mean()
        result["gpu_peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def environment() -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", help="shard dataset (needed by the shards/loader modes)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["synthetic", "shards"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="results/train_throughput.json")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    if {"shards", "loader"} & set(args.modes) and not args.data:
        parser.error("the shards and loader modes need --data DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    scratch = Path(tempfile.mkdtemp(prefix="train-bench-"))
    try:
        results = [run_mode(args, mode, scratch) for mode in args.modes]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "environment": environment(),
        "results": results,
    }
    print(
        f"{'mode':<10} {'model':<14} {'batch':>5} {'size':>5} {'samples/s':>10} "
        f"{'ms/step':>8} {'GPU util':>8}"
    )
    for r in results:
        util = r.get("gpu_util_mean_pct")
        print(
            f"{r['mode']:<10} {r['model']:<14} {r['batch_size']:>5} {r['image_size']:>5} "
            f"{r['samples_per_s']:>10.1f} {r['step_ms']:>8.1f} "
            f"{'-' if util is None else f'{util:.0f}%':>8}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
