"""Where one training step's time goes: step time by batch size and a torch.profiler table.

Builds a registered model with random weights, feeds random tensors already on the
device (no data loading), and times forward + loss + backward + SGD step, the same
operations as ``pipeline.loop.train_loop``. Needs only torch (no Ray)::

    python -m bench.profile_step --model tirg --image-size 224 --batches 32 256 \\
        --json-out results/profile_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline.losses import compute_loss
from pipeline.models import create_model, list_models
from pipeline.models.small_map_conv import use_plain_convs


def make_batch(
    batch: int, size: int, text_len: int, vocab: int, device: torch.device, channels_last: bool
) -> dict[str, torch.Tensor]:
    """Random (ref, tokens, lengths, target) tensors on ``device``."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = [
        torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        for _ in range(2)
    ]
    tokens = torch.randint(2, vocab, (batch, text_len), device=device)
    lengths = torch.randint(1, text_len + 1, (batch,), device=device)
    return {"ref": images[0], "tgt": images[1], "tokens": tokens, "lengths": lengths}


def run_steps(
    model, optimizer, batch, steps: int, loss_name: str, amp: bool, device: torch.device
) -> float:
    """Mean seconds per training step over ``steps`` steps (after the caller's warm-up)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            outputs = model(batch["ref"], batch["tokens"], batch["lengths"], batch["tgt"])
            loss, _ = compute_loss(outputs, loss_name)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tirg", choices=list_models())
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--loss", default="soft_triplet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-amp", action="store_true", help="float32 on a GPU")
    parser.add_argument(
        "--amp-on-cpu", action="store_true", help="bf16 autocast on a CPU too (AVX-512 BF16)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument(
        "--plain-convs",
        action="store_true",
        help="nn.Conv2d on 2x2 maps too (no per-tap products: pipeline.models.small_map_conv)",
    )
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument(
        "--by-shape", action="store_true", help="one profile row per operator and input shape"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    amp = not args.no_amp and (device.type == "cuda" or args.amp_on_cpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    channels_last = not args.no_channels_last
    torch.manual_seed(0)
    model = create_model(args.model, vocab_size=1000).to(device)
    if args.plain_convs:
        use_plain_convs(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    rows = []
    print(f"{'batch':>6} {'step ms':>9} {'triplets/s':>11} {'images/s':>9}")
    for batch_size in args.batches:
        batch = make_batch(batch_size, args.image_size, 12, 1000, device, channels_last)
        run_steps(model, optimizer, batch, args.warmup, args.loss, amp, device)
        seconds = run_steps(model, optimizer, batch, args.steps, args.loss, amp, device)
        rows.append(
            {
                "batch_size": batch_size,
                "step_ms": seconds * 1e3,
                "triplets_per_s": batch_size / seconds,
                "images_per_s": 2 * batch_size / seconds,
            }
        )
        print(
            f"{batch_size:6d} {seconds * 1e3:9.2f} {batch_size / seconds:11.0f} "
            f"{2 * batch_size / seconds:9.0f}"
        )

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    batch = make_batch(args.batches[0], args.image_size, 12, 1000, device, channels_last)
    with torch.profiler.profile(activities=activities, record_shapes=args.by_shape) as prof:
        run_steps(model, optimizer, batch, 5, args.loss, amp, device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages(group_by_input_shape=args.by_shape)
    table = averages.table(sort_by=sort, row_limit=args.profile_rows)
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    print(table)
    print(cpu_table)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "image_size": args.image_size,
                    "amp": amp,
                    "channels_last": channels_last,
                    "cudnn_benchmark": args.cudnn_benchmark,
                    "plain_convs": args.plain_convs,
                    "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else platform.processor(),
                    "torch": torch.__version__,
                    "rows": rows,
                    "profile_by_device_time": table,
                    "profile_by_cpu_time": cpu_table,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
