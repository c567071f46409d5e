"""The export artifact directory (``ART_DIR``): its ``artifacts.json``, validation, and the
atomic write that keeps a half-written export from ever looking finished.

Layout (agreed with ``serve/``; the full text is in docs/export.md)::

    ART_DIR/artifacts.json   model name, embedding size, graphs (files, named inputs and
                             outputs with symbolic "batch"/"length" dims), preprocessing,
                             tokenizer rules, source checkpoint hash, parity figures
    ART_DIR/vocab.json       pipeline.vocab.Vocabulary.to_dict()
    ART_DIR/checkpoint.pt    copy of the source checkpoint (torch backend, re-export)
    ART_DIR/<graph>.onnx     image_encoder, text_encoder, composer, target_head, correction
    ART_DIR/engines/         TensorRT engines (export.trt)
    ART_DIR/index/           gallery index (export.index)

Graph tensor names (one scheme, ``pipeline.models.export_wrappers.graph_tensor_names``):
image representations are ``repr_<name>``, text representations ``text_<name>``; the
correction graph takes ``ref_<name>``, ``cand_<name>``, ``text_<name>``.

``load_artifacts(ART_DIR)`` reads, validates and types the listing once: an
``Artifacts`` object (graphs, tensor names, preprocessing, the vocabulary) that the
runtime, the query engine, the index builder and the TensorRT builder share.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.partials import claim_partial_dir, release_owner_file
from pipeline.vocab import Vocabulary

ARTIFACTS_FORMAT = "composed-retrieval-artifacts/1"
ARTIFACTS_FILE = "artifacts.json"
VOCAB_FILE = "vocab.json"
CHECKPOINT_COPY = "checkpoint.pt"
# Serving order; "text_encoder" is absent for image-only models, "correction" exists for
# models with a correction network (CCNet).
GRAPH_NAMES = ("image_encoder", "text_encoder", "composer", "target_head", "correction")
SYMBOLIC_DIMS = ("batch", "length")


class ArtifactError(ValueError):
    """An artifact directory or file is missing, malformed, or disagrees with artifacts.json."""


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its ONNX file and its named tensors (shapes use the symbolic
    dims "batch" and "length"; dtypes are numpy names)."""

    name: str
    file: Path
    inputs: dict[str, list]
    outputs: dict[str, list]
    dtypes: dict[str, str]
    sha256: str | None = None

    def shape(self, tensor: str, batch: int, length: int = 1) -> tuple[int, ...]:
        """Concrete shape of an input or output at ``batch`` and text ``length``."""
        declared = self.inputs.get(tensor, self.outputs.get(tensor))
        if declared is None:
            raise ArtifactError(f"{self.file}: graph {self.name!r} has no tensor {tensor!r}")
        return concrete_shape(declared, batch, length)

    @property
    def uses_length(self) -> bool:
        return any("length" in shape for shape in self.inputs.values())


@dataclass(frozen=True)
class Artifacts:
    """``ART_DIR/artifacts.json`` read once, validated and typed (``load_artifacts``).

    ``info`` keeps the listing as written (parity and recall figures, tokenizer rules).
    """

    dir: Path
    model_name: str
    embed_dim: int
    image_repr_names: tuple[str, ...]
    text_repr_names: tuple[str, ...]
    has_correction: bool
    graphs: dict[str, GraphSpec]
    preprocess: dict[str, Any]
    max_text_len: int
    vocab: Vocabulary
    checkpoint_file: Path
    checkpoint_sha256: str
    loss_scale: float | None
    info: dict[str, Any]

    def graph(self, name: str) -> GraphSpec:
        """The ``name`` graph; ``ArtifactError`` naming what the model has otherwise."""
        if name not in self.graphs:
            raise ArtifactError(
                f"{self.dir}: model {self.model_name!r} has no {name!r} graph "
                f"(it has {sorted(self.graphs)})"
            )
        return self.graphs[name]

    @property
    def image_size(self) -> int:
        """Side S of the (B, 3, S, S) image batches the image encoder takes."""
        return int(self.preprocess["crop"])

    def image_preprocess(self):
        """The export's recipe as a ``pipeline.images.ImagePreprocess``."""
        from pipeline.images import ImagePreprocess

        pre = self.preprocess
        if int(pre["resize"]) != int(pre["crop"]):
            raise ArtifactError(
                f"{self.dir}: preprocess resize {pre['resize']} != crop {pre['crop']}; "
                "the runtime reproduces ImagePreprocess (resize shorter side = crop)"
            )
        return ImagePreprocess(int(pre["crop"]), mean=pre["mean"], std=pre["std"])


# -- reading ---------------------------------------------------------------------------------
def load_artifacts(art_dir: str | Path) -> Artifacts:
    """Read and validate ``ART_DIR/artifacts.json`` and its vocabulary; every graph file it
    names must exist. Raises ``ArtifactError`` naming the file and what is wrong."""
    art_dir = Path(art_dir)
    path = art_dir / ARTIFACTS_FILE
    if not art_dir.is_dir():
        raise ArtifactError(
            f"{art_dir}: artifact directory does not exist "
            "(expected the output of `python -m export.onnx`)"
        )
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing (expected the artifacts.json written by export.onnx; "
            "an interrupted export leaves only ART_DIR.partial-*)"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from err
    validate_artifacts(info, where=str(path))
    root = art_dir.resolve()
    graphs = {}
    for graph, entry in info["graphs"].items():
        file = root / entry["file"]
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (artifacts.json lists it for graph {graph!r})")
        graphs[graph] = GraphSpec(
            graph,
            file,
            dict(entry["inputs"]),
            dict(entry["outputs"]),
            dict(entry["dtypes"]),
            entry.get("sha256"),
        )
    vocab_file = root / info["tokenizer"]["vocab_file"]
    if not vocab_file.is_file():
        raise ArtifactError(f"{vocab_file}: missing (artifacts.json names it as the vocabulary)")
    try:
        vocab = Vocabulary.load(vocab_file)
    except (OSError, ValueError, KeyError) as err:
        raise ArtifactError(f"{vocab_file}: not a vocabulary file ({err})") from err
    scale = info.get("loss_scale")
    return Artifacts(
        dir=root,
        model_name=str(info["model_name"]),
        embed_dim=int(info["embed_dim"]),
        image_repr_names=tuple(info["image_repr_names"]),
        text_repr_names=tuple(info["text_repr_names"]),
        has_correction=bool(info["has_correction"]),
        graphs=graphs,
        preprocess=dict(info["preprocess"]),
        max_text_len=int(info["tokenizer"]["max_text_len"]),
        vocab=vocab,
        checkpoint_file=root / info["checkpoint"]["file"],
        checkpoint_sha256=str(info["checkpoint"]["sha256"]),
        loss_scale=None if scale is None else float(scale),
        info=info,
    )


def validate_artifacts(arts: Any, where: str = ARTIFACTS_FILE) -> None:
    """Check the structure of an artifacts.json dict (see the module docstring)."""
    if not isinstance(arts, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    if arts.get("format") != ARTIFACTS_FORMAT:
        raise ArtifactError(
            f"{where}: format {arts.get('format')!r}, expected {ARTIFACTS_FORMAT!r}"
        )
    for key in (
        "model_name",
        "embed_dim",
        "image_repr_names",
        "text_repr_names",
        "has_correction",
        "opset",
        "graphs",
        "preprocess",
        "tokenizer",
        "checkpoint",
    ):
        if key not in arts:
            raise ArtifactError(f"{where}: missing key {key!r}")
    graphs = arts["graphs"]
    wanted = expected_graphs(arts["text_repr_names"], arts["has_correction"])
    for graph in wanted:
        if graph not in graphs:
            raise ArtifactError(f"{where}: graph {graph!r} missing (expected graphs {wanted})")
    for graph, info in graphs.items():
        if graph not in GRAPH_NAMES:
            raise ArtifactError(f"{where}: unknown graph {graph!r}, expected one of {GRAPH_NAMES}")
        for key in ("file", "inputs", "outputs", "dtypes"):
            if key not in info:
                raise ArtifactError(f"{where}: graph {graph!r} misses {key!r}")
        for name, shape in {**info["inputs"], **info["outputs"]}.items():
            if not isinstance(shape, list) or not all(
                isinstance(d, int) or d in SYMBOLIC_DIMS for d in shape
            ):
                raise ArtifactError(
                    f"{where}: graph {graph!r} tensor {name!r} has shape {shape!r}, "
                    f"expected a list of ints and {SYMBOLIC_DIMS}"
                )
    for key in ("image_size", "resize", "crop", "mean", "std"):
        if key not in arts["preprocess"]:
            raise ArtifactError(f"{where}: preprocess misses {key!r}")
    for key in ("file", "sha256"):
        if not isinstance(arts["checkpoint"], dict) or key not in arts["checkpoint"]:
            raise ArtifactError(f"{where}: checkpoint misses {key!r}")
    for key in ("vocab_file", "max_text_len", "pad_id", "unk_id"):
        if key not in arts["tokenizer"]:
            raise ArtifactError(f"{where}: tokenizer misses {key!r}")


def expected_graphs(text_repr_names: list[str], has_correction: bool) -> list[str]:
    """Graphs a model exports: no text encoder for a model that reads no text, a correction
    graph only for models with a correction network."""
    return [
        g
        for g in GRAPH_NAMES
        if (g != "text_encoder" or text_repr_names) and (g != "correction" or has_correction)
    ]


def concrete_shape(shape: list, batch: int, length: int = 1) -> tuple[int, ...]:
    """Replace the symbolic dims of an artifacts.json shape by sizes."""
    sizes = {"batch": batch, "length": length}
    return tuple(sizes[d] if isinstance(d, str) else int(d) for d in shape)


# -- writing ---------------------------------------------------------------------------------
def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file + rename (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def staging_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield ``OUT.partial-<pid>``; on success it replaces ``OUT``, on error it is removed.
    Partials that killed exports left are removed first (``pipeline.partials``).

    An existing ``OUT`` is refused unless ``overwrite`` (its engines/ and index/ were made
    from the old graphs and would no longer match).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ArtifactError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    tmp = claim_partial_dir(out_dir)  # removes the partials of killed exports
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    release_owner_file(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
