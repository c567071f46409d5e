"""A real artifact directory for the serving tests, built by the export code itself.

``serving_artifacts(base)`` writes a tiny shard dataset (``shard_fixtures``), a
random-weight model checkpoint (embed_dim 32, 32 px images), exports it with
``export.onnx`` and builds its gallery index with ``export.index`` -- once per test
session: later calls with the same ``base`` reuse the finished directory.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch
from shard_fixtures import write_dataset

GALLERY_SIZE = 40
IMAGE_SIZE = 32
EMBED_DIM = 32


def serving_artifacts(base: Path, model_name: str = "tirg") -> tuple[Path, Path]:
    """``(ART_DIR, shard dir)`` for ``model_name``; ART_DIR holds ``index/``."""
    base = Path(base) / f"serve-{model_name}"
    art_dir, data_dir = base / "artifacts", base / "shards"
    if (art_dir / "index" / "index.json").is_file():
        return art_dir, data_dir
    from export.index import build_index
    from export.onnx import export_artifacts
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import create_model, size_kwarg
    from pipeline.vocab import Vocabulary

    base.mkdir(parents=True, exist_ok=True)
    write_dataset(data_dir, gallery_size=GALLERY_SIZE, image_size=IMAGE_SIZE, query_count=8)
    queries = json.loads((data_dir / "queries.json").read_text())
    vocab = Vocabulary.build([q["text"] for q in queries] + ["make it red", "add a circle"])
    torch.manual_seed(0)
    model = create_model(model_name, vocab_size=len(vocab), **{size_kwarg(model_name): EMBED_DIM})
    config = {
        "name": f"serve-test-{model_name}",
        "model": {"name": model_name},
        "image": {"size": IMAGE_SIZE},
    }
    save_checkpoint(base / "checkpoint", model, vocab, config)
    export_artifacts(base / "checkpoint", art_dir, image_size=IMAGE_SIZE, threads=1)
    build_index(art_dir, data_dir, threads=1, batch_size=16, show_progress=False)
    return art_dir, data_dir


def limit_threads() -> None:
    """The test box has 2 shared cores: keep torch to one thread."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a background thread, configured
    from ``limits`` as ``python -m serve`` configures it (``serve.http_server``)."""

    def __init__(self, app, limits):
        import uvicorn

        from serve.http_server import uvicorn_config

        config = uvicorn_config(
            app,
            limits,
            "127.0.0.1",
            0,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
