"""Fixtures shared by the serving tests: one exported artifact directory per session and a
torch ``QueryEngine`` over it per module. A module that needs another engine (other
limits, another backend) or another artifact directory defines its own fixture of the
same name, which takes precedence over these."""

from __future__ import annotations

import pytest
from serve_fixtures import limit_threads, serving_artifacts


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    """``serving_artifacts``' directory (TIRG, random weights, 40-image gallery index)."""
    limit_threads()
    return serving_artifacts(tmp_path_factory.getbasetemp())[0]


@pytest.fixture(scope="module")
def engine(art_dir):
    """A CPU torch ``QueryEngine`` over ``art_dir``, closed after the module."""
    from serve.engine import QueryEngine

    engine = QueryEngine(art_dir, backend="torch", device="cpu")
    yield engine
    engine.close()
