"""CPU forward + backward of ResNet's 3x3 convolutions onto 2x2 maps: nn.Conv2d's
kernel against per-tap matrix products (pipeline.models.small_map_conv).

One row per shape a ResNet-18 trunk trains on at 64 px (its last stage) and 32 px (the
stage before), the composers' biased convs on the last map (tirg_lastconv, film at
D = 512), plus the shapes where per-tap products do not pay (why they stop at 2x2 maps
and 256 input channels).
Each rep is forward + backward to the input and the float32 weight, under CPU bf16
autocast by default, timed in rounds that alternate the two kernels (this machine's
speed drifts by minutes); the table gives each kernel's fastest and median round.

    python -m bench.small_map_conv --threads 1 --json-out results/small_map_conv.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.models.small_map_conv import (
    MAX_OUT_SIDE,
    MIN_IN_CHANNELS,
    out_side,
    per_tap_conv,
)

# (C_in, C_out, input side, stride, bias, where it runs)
SHAPES = [
    (512, 512, 2, 1, False, "resnet18 layer4 at 64 px (3 per image)"),
    (256, 512, 4, 2, False, "resnet18 layer4 first conv at 64 px"),
    (256, 256, 2, 1, False, "resnet18 layer3 at 32 px"),
    (1024, 1024, 2, 1, True, "tirg_lastconv gate/residual first conv at 64 px (2 per query)"),
    (1024, 512, 2, 1, True, "tirg_lastconv gate/residual second conv at 64 px (2 per query)"),
    (512, 512, 2, 1, True, "film residual block conv at 64 px"),
    (128, 256, 4, 2, False, "resnet18 layer3 first conv at 32 px (not replaced: 128 in)"),
    (256, 256, 4, 1, False, "resnet18 layer3 at 64 px (not replaced: 4x4 out)"),
]


def forward_backward(
    conv: Callable, x, weight, bias, grad_out, autocast: bool
) -> Callable[[], None]:
    """One rep: conv forward under ``autocast`` and backward to x, weight and bias."""

    def rep() -> None:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        with context:
            out = conv(x, weight, bias)
        out.float().backward(grad_out)
        x.grad = weight.grad = None
        if bias is not None:
            bias.grad = None

    return rep


def time_kernels(reps: dict[str, Callable[[], None]], rounds: int, per_round: int):
    """ms per rep of each kernel: (fastest round, median round), rounds alternating."""
    times: dict[str, list[float]] = {name: [] for name in reps}
    for _ in range(rounds):
        for name, rep in reps.items():
            rep()
            start = time.perf_counter()
            for _ in range(per_round):
                rep()
            times[name].append((time.perf_counter() - start) / per_round * 1e3)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--float32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = not args.float32
    torch.manual_seed(0)
    rows = []
    print(
        f"{'C_in':>5} {'C_out':>5} {'map':>5} {'stride':>6} {'conv2d ms':>10} "
        f"{'per-tap ms':>11} {'speed-up':>8}  where"
    )
    for c_in, c_out, side, stride, with_bias, where in SHAPES:
        cl = torch.channels_last
        x = torch.randn(args.batch, c_in, side, side).to(memory_format=cl).requires_grad_()
        weight = (torch.randn(c_out, c_in, 3, 3) * 0.02).to(memory_format=cl).requires_grad_()
        bias = torch.zeros(c_out).requires_grad_() if with_bias else None
        out = out_side(side, stride)
        grad_out = torch.randn(args.batch, c_out, out, out).to(memory_format=cl)
        kernels = {
            "conv2d": lambda a, w, b, s=stride: F.conv2d(a, w, b, stride=s, padding=1),
            "per_tap": lambda a, w, b, s=stride: per_tap_conv(a, w, s, b),
        }
        reps = {
            k: forward_backward(f, x, weight, bias, grad_out, autocast) for k, f in kernels.items()
        }
        timing = time_kernels(reps, args.rounds, args.per_round)
        speed_up = timing["conv2d"][0] / timing["per_tap"][0]
        rows.append(
            {
                "c_in": c_in,
                "c_out": c_out,
                "in_side": side,
                "stride": stride,
                "bias": with_bias,
                "where": where,
                "replaced": out <= MAX_OUT_SIDE and c_in >= MIN_IN_CHANNELS,
                "conv2d_ms": {"min": timing["conv2d"][0], "median": timing["conv2d"][1]},
                "per_tap_ms": {"min": timing["per_tap"][0], "median": timing["per_tap"][1]},
                "speed_up": speed_up,
            }
        )
        print(
            f"{c_in:5d} {c_out:5d} {f'{side}x{side}':>5} {stride:6d} "
            f"{timing['conv2d'][0]:10.2f} {timing['per_tap'][0]:11.2f} {speed_up:7.2f}x  {where}"
        )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(
            json.dumps(
                {
                    "batch": args.batch,
                    "threads": torch.get_num_threads(),
                    "autocast_bf16": autocast,
                    "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=1,
            )
        )
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
