"""Checkpoint files: model weights + vocabulary + resolved config (+ optimiser state).

A checkpoint is a directory holding ``checkpoint.pt`` (a dict, torchvision-references
style) plus ``vocab.json`` and ``config.json`` copies for people and tools to read::

    {"format": "composed-retrieval-checkpoint/1", "model_name": "tirg",
     "model_kwargs": {...}, "model": state_dict, "vocab": {...}, "config": {...},
     "optimizer": state_dict | None, "scheduler": state_dict | None, "step": int,
     "metrics": {...}}

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, so a crafted file cannot run code when it is loaded. The vocabulary,
config and metrics are stored as plain JSON values for that reason (``save_checkpoint``
converts them). Where a digest of the file is known (an artifact directory records
one), it is checked before a byte of the file is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.vocab import Vocabulary

CHECKPOINT_FORMAT = "composed-retrieval-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint path is missing, corrupt or not one of ours."""


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    vocab: Vocabulary,
    config: dict[str, Any],
    *,
    optimizer=None,
    scheduler=None,
    step: int = 0,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/checkpoint.pt`` atomically (temp file + rename); returns the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "model": model.state_dict(),
        "vocab": plain_json(vocab.to_dict()),
        "config": plain_json(config),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "metrics": plain_json(metrics or {}),
        "rng": rng_state(),
    }
    tmp = directory / f".{CHECKPOINT_FILE}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    (directory / "vocab.json").write_text(json.dumps(vocab.to_dict()))
    (directory / "config.json").write_text(json.dumps(config, indent=1, default=str))
    return directory


def rng_state() -> dict[str, torch.Tensor | None]:
    """torch's CPU and (when initialised) current CUDA generator states: dropout and
    soft triplet's negatives draw from them, so a resumed run restores them to train
    on as an uninterrupted run would (``restore_rng_state``)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state: dict[str, Any] | None) -> None:
    """Undo ``rng_state`` (a checkpoint without one leaves the generators seeded)."""
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def plain_json(value: Any) -> Any:
    """``value`` as plain JSON types (numpy scalars, paths and tuples become numbers,
    strings and lists), which ``torch.load(weights_only=True)`` reads back."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path} (expected a directory with {CHECKPOINT_FILE})"
        )
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", sha256: str | None = None
) -> dict[str, Any]:
    """Read and validate a checkpoint dict (weights only: no pickled code runs).

    With ``sha256`` the file's digest must match before it is read at all.
    """
    file = checkpoint_file(path)
    if sha256 is not None and (problem := sha256_mismatch(file, sha256)):
        raise CheckpointError(problem)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or unsafe file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{file} is not a readable checkpoint (weights-only load refused it: {first})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file} is not a {CHECKPOINT_FORMAT} checkpoint")
    return payload


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    expect_model: str | None = None,
    sha256: str | None = None,
):
    """Rebuild the model of a checkpoint: returns ``(model.eval(), vocab, payload)``.

    ``sha256``: the digest the file must have (``load_checkpoint``)."""
    from pipeline.models import create_model

    payload = load_checkpoint(path, map_location="cpu", sha256=sha256)
    if expect_model is not None and payload["model_name"] != expect_model:
        raise CheckpointError(
            f"{path} holds model {payload['model_name']!r}, expected {expect_model!r}"
        )
    kwargs = dict(payload["model_kwargs"])
    kwargs.pop("pretrained_path", None)  # weights come from the checkpoint itself
    kwargs.pop("word_vectors_path", None)  # (CCNet word vectors too: the file may be gone)
    model = create_model(payload["model_name"], **kwargs)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit model {payload['model_name']!r}: {err}"
        ) from err
    vocab = Vocabulary.from_dict(payload["vocab"])
    return model.to(device).eval(), vocab, payload


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (checkpoint hashes in export metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_mismatch(path: str | Path, expected: str) -> str | None:
    """None when ``path`` has the hex SHA-256 ``expected``, else the refusal message."""
    found = file_sha256(path)
    if found == expected:
        return None
    return (
        f"{path}: sha256 {found[:16]}... differs from the recorded {str(expected)[:16]}... "
        "(the file was changed or replaced after export); refusing to read it"
    )
