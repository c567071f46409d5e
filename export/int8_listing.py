"""The int8 graphs of an artifact directory: where they live and their listing.

``ART_DIR/int8/`` holds the statically quantized graphs that ``python -m export.int8``
writes (today the image encoder) and ``int8.json`` listing them: per graph the int8
file and its sha256, the sha256 of the float32 graph it was quantized from, and the
build's calibration, parity and recall figures. ``export.runtime.onnxruntime_graphs``
serves them with ``precision="int8"``; a float32 graph re-exported since makes the
listing stale, and the runtime refuses it rather than serve a model that is not the
export's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.artifacts import ArtifactError, Artifacts
from pipeline.checkpoint import sha256_mismatch

INT8_DIR = "int8"
INT8_FILE = "int8.json"
INT8_FORMAT = "composed-retrieval-int8/1"


def listing_path(art_dir: str | Path) -> Path:
    return Path(art_dir) / INT8_DIR / INT8_FILE


def read_listing(artifacts: Artifacts) -> dict[str, Any]:
    """``int8.json`` of the artifacts, or ``ArtifactError`` saying how to build it."""
    path = listing_path(artifacts.dir)
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing; build the int8 graphs with "
            f"`python -m export.int8 --artifacts {artifacts.dir} --data DATA_DIR`"
        )
    try:
        listing = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(listing, dict) or listing.get("format") != INT8_FORMAT:
        raise ArtifactError(f"{path}: format is not {INT8_FORMAT!r}")
    if not isinstance(listing.get("graphs"), dict) or not listing["graphs"]:
        raise ArtifactError(f"{path}: lists no graphs")
    return listing


def int8_graph_files(artifacts: Artifacts) -> dict[str, Path]:
    """``{graph: int8 ONNX file}`` for the graphs ``int8.json`` lists; ``ArtifactError``
    when a file is missing or altered, or was quantized from another float32 graph."""
    listing = read_listing(artifacts)
    files = {}
    for graph, entry in listing["graphs"].items():
        source = artifacts.graph(graph)
        if source.sha256 and entry.get("source_sha256") != source.sha256:
            raise ArtifactError(
                f"{listing_path(artifacts.dir)}: int8 {graph} was quantized from another "
                f"{source.file.name} (re-exported since); rebuild it with "
                f"`python -m export.int8 --artifacts {artifacts.dir} --data DATA_DIR`"
            )
        file = artifacts.dir / entry["file"]
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (int8.json lists it for graph {graph!r})")
        if problem := sha256_mismatch(file, entry["sha256"]):
            raise ArtifactError(problem)
        files[graph] = file
    return files
