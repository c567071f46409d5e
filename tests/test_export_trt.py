"""export.trt without TensorRT: the install message (exit 3), optimisation profiles from
artifacts.json, engine file names, the TensorRT 10 / 11 builder call sequences (through a
recording stand-in for the ``tensorrt`` module), FP16 conversion for strongly typed
networks, the timing cache, and the parity gate that keeps a bad engine from being written.
Production code always imports the real ``tensorrt``; the stand-in is passed in or put in
``sys.modules`` by these tests only."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from export_fixtures import cached_export, limit_threads

from export import engines
from export import trt as export_trt
from export.artifacts import ArtifactError, load_artifacts
from export.fp16 import convert_to_fp16
from export.parity import ParityError
from export.runtime.onnxruntime_graphs import ort_session

limit_threads()


def fake_tensorrt(version: str, calls: list) -> types.ModuleType:
    """A recording stand-in with the TensorRT 10 or 11 Python API surface export.trt uses.

    TensorRT 11 has no EXPLICIT_BATCH network flag and no FP16 builder flag: touching
    them raises AttributeError, as the real module does.
    """
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = "warning"

        def __init__(self, severity=None):
            self.severity = severity

    flags = {"STRONGLY_TYPED": 1} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (), flags)
    builder_flags = {"TF32": "TF32"} if major >= 11 else {"TF32": "TF32", "FP16": "FP16"}
    trt.BuilderFlag = type("BuilderFlag", (), builder_flags)
    trt.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": "WORKSPACE"})

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors, self.errors = network, 0, []

        def parse_from_file(self, path):
            model = onnx.load(path)
            self.network.path = path
            self.network.inputs = [Tensor(i.name) for i in model.graph.input]
            calls.append(("parse", path))
            return True

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, smallest, opt, largest):
            self.shapes[name] = (tuple(smallest), tuple(opt), tuple(largest))

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.pools, self.profiles = set(), set(), {}, []
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.cleared.add(flag)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(
                (
                    "build",
                    network.path,
                    sorted(config.flags),
                    sorted(config.cleared),
                    dict(config.pools),
                    config.profiles[0].shapes,
                    config.cache.data,
                )
            )
            return b"ENGINE:" + network.path.encode()

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


class OrtEngine:
    """Stands in for ``EngineRunner``: runs the ONNX file a fake engine was built from."""

    noise = 0.0

    def __init__(self, trt, engine_bytes, name="engine", logger=None, device="cuda"):
        path = engine_bytes[len(b"ENGINE:") :].decode()
        self.session = ort_session(path)
        self.names = [o.name for o in self.session.get_outputs()]
        self.device = torch.device("cpu")  # the real runner's tensors live on the GPU

    def __call__(self, feeds):
        out = self.session.run(self.names, {n: t.numpy() for n, t in feeds.items()})
        return {n: torch.from_numpy(v + self.noise) for n, v in zip(self.names, out)}


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    src, _ = cached_export(tmp_path_factory, "tirg")
    art = tmp_path_factory.mktemp("trt") / "art"  # engines/ are written into it
    shutil.copytree(src, art, ignore=shutil.ignore_patterns("index"))
    return art


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(export_trt, "cuda_compute_capability", lambda device=0: (8, 9))
    monkeypatch.setattr(export_trt, "EngineRunner", OrtEngine)


def test_missing_tensorrt_exits_3_with_install_instructions(art_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    code = export_trt.main(["--artifacts", str(art_dir)])
    err = capsys.readouterr().err
    assert code == export_trt.EXIT_NO_TENSORRT == 3
    assert "TensorRT is not installed" in err and "pip install tensorrt-cu12" in err
    assert "--extra-index-url https://pypi.nvidia.com" in err and "NGC" in err


def test_profiles_and_engine_names_follow_artifacts(art_dir):
    arts = load_artifacts(art_dir)
    shapes = export_trt.profile_shapes(
        arts.info["graphs"]["text_encoder"], max_batch=64, opt_batch=8, max_text_len=40
    )
    assert shapes == {"tokens": ((1, 1), (8, 16), (64, 40)), "lengths": ((1,), (8,), (64,))}
    image = export_trt.profile_shapes(arts.info["graphs"]["image_encoder"], 16, 4, 40)
    assert image == {"images": ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))}
    assert export_trt.profile_shapes(arts.info["graphs"]["text_encoder"], 4, 2, 8)["tokens"][1] == (
        2,
        8,
    )
    with pytest.raises(ValueError, match="opt batch"):
        export_trt.profile_shapes(arts.info["graphs"]["composer"], 4, 8, 16)
    name = engines.engine_file_name("composer", "10.13.0.35", (9, 0), "ab" * 32)
    assert name == "composer.trt10.13.0.35.sm90.abababababab.engine"
    assert (
        engines.engine_file_name("composer", "11.4.0", (8, 9), "cd" * 32, fp16=True)
        == "composer.trt11.4.0.sm89.cdcdcdcdcdcd.fp16.engine"
    )


def test_trt10_build_sequence_uses_explicit_batch_and_fp16_flag(art_dir):
    calls = []
    trt = fake_tensorrt("10.13.0.35", calls)
    arts = load_artifacts(art_dir)
    info = arts.info["graphs"]["composer"]
    shapes = export_trt.profile_shapes(info, 32, 8, 64)
    engine, cache = export_trt.build_engine(
        trt, art_dir / "composer.onnx", info, shapes, fp16=True, workspace_gb=2, timing_cache=b"old"
    )
    assert ("create_network", 1 << 0) in calls
    build = next(c for c in calls if c[0] == "build")
    _, path, flags, cleared, pools, profile, cache_in = build
    assert flags == ["FP16"] and cleared == [] and pools == {"WORKSPACE": 2 << 30}
    assert profile == shapes and cache_in == b"old" and cache == b"old+"
    assert engine == b"ENGINE:" + str(art_dir / "composer.onnx").encode()

    calls.clear()
    export_trt.build_engine(
        trt, art_dir / "composer.onnx", info, shapes, fp16=False, workspace_gb=1, timing_cache=b""
    )
    build = next(c for c in calls if c[0] == "build")
    assert build[2] == [] and build[3] == ["TF32"]  # fp32 parity needs TF32 off


def test_trt11_fp16_build_converts_onnx_and_records_engines(art_dir, gpu):
    calls = []
    trt = fake_tensorrt("11.4.0.106", calls)
    entries = export_trt.build_all(
        art_dir, fp16=True, max_batch=8, opt_batch=4, max_text_len=12, workspace_gb=1, trt=trt
    )
    engine_dir = art_dir / "engines"
    assert [e["graph"] for e in entries] == [
        "image_encoder",
        "text_encoder",
        "composer",
        "target_head",
    ]
    assert all(c[1] == 0 for c in calls if c[0] == "create_network")  # strongly typed
    builds = [c for c in calls if c[0] == "build"]
    assert all(b[2] == [] for b in builds)  # no FP16 flag on TensorRT 11
    # the timing cache is shared: each build starts from the previous one's cache
    assert [b[6] for b in builds] == [b"", b"+", b"++", b"+++"]
    assert (engine_dir / "timing.cache").read_bytes() == b"++++"
    for entry in entries:
        fp16_onnx = engine_dir / f"{entry['graph']}.fp16.onnx"
        assert entry["onnx"] == fp16_onnx.name
        assert re.fullmatch(
            rf"{entry['graph']}\.trt11\.4\.0\.106\.sm89\.[0-9a-f]{{12}}"
            r"\.fp16\.engine",
            entry["file"],
        )
        assert entry["file"].split(".")[-3] == export_trt.onnx_sha256(fp16_onnx)[:12]
        model = onnx.load(str(fp16_onnx))
        assert all(
            i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16
            for i in list(model.graph.input) + list(model.graph.output)
        )
        weights = {w.data_type for w in model.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in weights or entry["graph"] == "target_head"
        assert entry["parity"]["max_abs_diff"] <= 2e-2 and entry["parity"]["min_cosine"] > 0.999
        assert (engine_dir / entry["file"]).read_bytes().startswith(b"ENGINE:")
    listing = json.loads((engine_dir / "engines.json").read_text())
    assert [e["file"] for e in listing["engines"]] == [e["file"] for e in entries]
    found = engines.find_engine(listing, "composer", "11.4.0.106", (8, 9), fp16=True)
    assert found["file"] == entries[2]["file"]
    assert engines.find_engine(listing, "composer", "11.4.0.106", (8, 9), fp16=False) is None
    assert engines.find_engine(listing, "composer", "11.4.0.106", (9, 0), fp16=True) is None


def test_engine_failing_parity_is_not_written(art_dir, gpu, monkeypatch, capsys):
    monkeypatch.setattr(OrtEngine, "noise", 5e-3)  # > 1e-3 fp32 tolerance
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.0.35", []))
    before = (
        set((art_dir / "engines").glob("*.engine")) if (art_dir / "engines").exists() else set()
    )
    code = export_trt.main(
        ["--artifacts", str(art_dir), "--graphs", "target_head", "--max-batch", "4"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "target_head.trt10.13.0.35.sm89" in err[0]
    assert "max abs diff" in err[0]
    assert set((art_dir / "engines").glob("*.engine")) == before


def test_parser_errors_and_input_mismatch_are_reported(art_dir, tmp_path):
    trt = fake_tensorrt("10.13.0.35", [])

    class FailingParser(trt.OnnxParser):
        def parse_from_file(self, path):
            self.errors, self.num_errors = ["Unsupported op: Foo", "node 3: bad attr"], 2
            return False

    arts = load_artifacts(art_dir)
    info = arts.info["graphs"]["composer"]
    shapes = export_trt.profile_shapes(info, 4, 2, 8)
    trt.OnnxParser = FailingParser
    with pytest.raises(engines.EngineBuildError, match="Unsupported op: Foo; node 3"):
        export_trt.build_engine(
            trt,
            art_dir / "composer.onnx",
            info,
            shapes,
            fp16=False,
            workspace_gb=1,
            timing_cache=b"",
        )
    trt = fake_tensorrt("10.13.0.35", [])
    with pytest.raises(ArtifactError, match="composer.onnx: network inputs"):
        export_trt.build_engine(
            trt,
            art_dir / "composer.onnx",
            arts.info["graphs"]["target_head"],
            shapes,
            fp16=False,
            workspace_gb=1,
            timing_cache=b"",
        )


def test_parity_gate_tolerances():
    info = {"inputs": {"x": ["batch", 4]}, "dtypes": {"x": "float32"}}
    cases = export_trt.parity_cases(max_batch=8, max_text_len=16)
    assert (1, 1) in cases and (8, 16) in cases

    def reference(feeds):
        return {"y": feeds["x"] * 2.0}

    def noisy(scale):
        return lambda feeds: {"y": feeds["x"] * 2.0 + scale}

    stats = export_trt.check_engine_parity(reference, reference, info, cases, 10, False, "same")
    assert stats == {"max_abs_diff": 0.0, "min_cosine": pytest.approx(1.0)}
    with pytest.raises(ParityError, match="fp32 engine"):
        export_trt.check_engine_parity(
            noisy(5e-3), reference, info, cases, 10, False, "fp32 engine"
        )
    export_trt.check_engine_parity(noisy(5e-3), reference, info, cases, 10, True, "fp16")
    with pytest.raises(ParityError, match="max abs diff"):
        export_trt.check_engine_parity(noisy(5e-2), reference, info, cases, 10, True, "fp16")


def test_fp16_conversion_keeps_float32_io_and_accuracy(art_dir, tmp_path):
    src = art_dir / "text_encoder.onnx"
    dst = convert_to_fp16(src, tmp_path / "text_encoder.fp16.onnx")
    fp32, fp16 = ort_session(src), ort_session(dst)
    rng = np.random.default_rng(0)
    feeds = {
        "tokens": rng.integers(2, 8, (3, 6)).astype(np.int64),
        "lengths": np.array([6, 2, 4], dtype=np.int64),
    }
    want, got = fp32.run(None, feeds)[0], fp16.run(None, feeds)[0]
    assert got.dtype == np.float32
    assert np.abs(want - got).max() < 2e-2


def test_real_engines_match_onnxruntime_through_the_runtime(art_dir):
    """Engine parity with the real TensorRT: built by export.trt, run by export.runtime
    (skipped where TensorRT or a CUDA GPU is missing; the fakes above check no parity)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA's index)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from export.runtime import open_runtime

    export_trt.build_all(art_dir, max_batch=8, opt_batch=4, max_text_len=16, workspace_gb=1)
    engines_rt = open_runtime(art_dir, "tensorrt", "cuda")
    reference = open_runtime(art_dir, "onnxruntime", "cpu", threads=1)
    side = reference.artifacts.image_size
    images = torch.randn((3, 3, side, side), generator=torch.Generator().manual_seed(0))
    tokens, lengths = reference.tokenize(["make it red", "add a circle left", "x"])
    want = reference.query(images, tokens, lengths)
    got = engines_rt.query(images.cuda(), tokens.cuda(), lengths.cuda())
    assert got.is_cuda and (got.cpu() - want).abs().max() <= 1e-3
