"""Parameter counts and forward latency of every registered model.

For each model (eval mode, ``torch.inference_mode``) it times two things at each batch
size: ``forward`` (reference + target images + text -> query and target embeddings, and
CCNet's (B, B) correction matrix) and ``query`` (encode reference + text, compose: what a
search request costs without the stored-gallery lookup). Median over ``--repeats`` runs
after ``--warmup`` runs. Prints a table and writes JSON.

    python bench/model_latency.py                        # 224 px, batch 1 and 64, CPU
    python bench/model_latency.py --image-size 64 --json-out model_latency_64.json

Models are built with their defaults (embed_dim 512, ResNet-18) except CCNet, which uses
``--ccnet-expert-dim`` (D per expert: 1024, as configs/ccnet_base.yaml) on the same ``--backbone``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script Python puts bench/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from pipeline.models import create_model, list_models  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--text-len", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=5000)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--ccnet-expert-dim", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", default="model_latency.json")
    return p.parse_args(argv)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    kwargs = {"vocab_size": args.vocab_size, "image_backbone": args.backbone}
    if name == "ccnet":
        kwargs["expert_dim"] = args.ccnet_expert_dim
    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(device).eval()
    row = {
        "model": name,
        "embed_dim": model.embed_dim,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "backbone_params_m": sum(p.numel() for p in model.image_encoder.backbone.parameters())
        / 1e6,
    }
    for batch in args.batch_sizes:
        images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
        tokens = torch.randint(2, args.vocab_size, (batch, args.text_len), device=device)
        lengths = torch.full((batch,), args.text_len, device=device)

        def forward(images=images, tokens=tokens, lengths=lengths):
            return model(images, tokens, lengths, images)

        def query(images=images, tokens=tokens, lengths=lengths):
            return model.compose(model.encode_image(images), model.encode_text(tokens, lengths))

        with torch.inference_mode():
            row[f"forward_ms_b{batch}"] = timed(forward, device, args.warmup, args.repeats)
            row[f"query_ms_b{batch}"] = timed(query, device, args.warmup, args.repeats)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.models or list_models()
    rows = []
    for name in names:
        rows.append(measure(name, args, device))
        logging.info("%s: %s", name, rows[-1])
    cols = ["model", "embed_dim", "params_m", "backbone_params_m"] + [
        f"{kind}_ms_b{b}" for b in args.batch_sizes for kind in ("forward", "query")
    ]
    print(
        f"image {args.image_size}px, text {args.text_len} tokens, {args.backbone}, "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print(
            "| "
            + " | ".join(
                f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols
            )
            + " |"
        )
    meta = {
        "image_size": args.image_size,
        "batch_sizes": args.batch_sizes,
        "text_len": args.text_len,
        "backbone": args.backbone,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg()[0],
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
