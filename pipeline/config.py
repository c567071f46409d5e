"""Run configuration: YAML files with inheritance, ``--set`` overrides, validation.

A run config is a nested dict of the shape agreed in the project brief (``DEFAULTS``
below lists every key with its default). A YAML file may name a ``base:`` file
(relative to itself); the file's keys are deep-merged over the base's, the base's over
``DEFAULTS``. ``--set key.sub=value`` overrides take YAML-parsed values and win over
everything. A switch merges a named section of the config before the overrides:
``demo: true`` its ``demo_settings`` (small images, few steps, 2 workers), ``paper: true``
its ``paper_settings`` (the paper's own recipe where the shipped default was chosen by
measurement, e.g. CSS's loss); so ``--set demo=true --set train.steps=50`` still runs
50 steps.

Sections whose keys depend on the chosen model or loss (``model``, ``loss``) accept any
key; every other section accepts only the keys in ``DEFAULTS`` and names the closest
known key when one is misspelt.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.images import IMAGENET_MEAN, IMAGENET_STD

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "data": None,  # shard dataset directory (shards/manifest.py)
    "out": None,  # run directory; default runs/<name>
    "demo": False,  # merge ``demo_settings`` (CPU-sized run)
    "demo_settings": {},
    "paper": False,  # merge ``paper_settings`` (the paper's recipe)
    "paper_settings": {},
    "fault_injection": None,  # {"step": N, "rank": R}: rank R exits once at step N (tests)
    "tune": None,  # search space of tune.search (tune/space.py); training ignores it
    "model": {  # and the model's own keywords (each defaults to its constructor's)
        "name": "tirg",
        "image_backbone": "resnet18",
        "pretrained_path": None,
    },
    "loss": {"name": "soft_triplet"},
    "optim": {
        "name": "sgd",  # sgd | adam | adamw
        "lr": 0.01,
        "momentum": 0.9,
        "betas": [0.9, 0.999],
        "weight_decay": 1e-6,
        "schedule": "step",  # step | exponential | constant
        "decay_steps": 50000,  # int, or "epoch" (= batches per epoch)
        "gamma": 0.1,
        "warmup_steps": 0,
        "grad_clip": None,  # max gradient L2 norm, None = off
        "backbone_lr_mult": 1.0,
    },
    "train": {
        "steps": 160000,
        # Wall-clock budget of one run's training in seconds (None = none): when it is
        # spent, the run ends at the step it reached as if that were train.steps
        # (evaluation, checkpoint, metrics["step"] = the steps trained).
        "time_limit_s": None,
        "batch_size": 32,  # per worker
        "workers": 1,  # Ray Train workers; 0 = in-process loop without Ray
        "use_gpu": "auto",  # auto | true | false
        "cpus_per_worker": 1.0,
        "gpus_per_worker": 1.0,
        "threads": None,  # torch.set_num_threads per worker, None = leave as is
        "loader_workers": 2,
        "shuffle_buffer": 1000,
        # Triplets of one group kept together in a batch: 1 = independent triplets (the
        # papers' random batches); k > 1 puts k modifications of a scene in each other's
        # batch as hard negatives (pipeline.shard_groups.group_runs); 2 on CSS is the
        # TIRG authors' sampler (16 references x 2 modifications per batch of 32).
        "triplets_per_group": 1,
        # Training images decoded once onto the device (pipeline.image_cache):
        # none | device | auto (= device when it fits image_cache_gb, else stream).
        "image_cache": "auto",
        "image_cache_gb": None,  # None = half the free GPU memory / a quarter of free RAM
        # The whole training step as one CUDA graph (pipeline.step_graph):
        # auto | true | false; auto = on CUDA, eager elsewhere (one log line says why).
        "step_graph": "auto",
        "batches_per_epoch": None,  # None = pipeline.data.default_batches_per_epoch
        "max_text_len": 40,
        "seed": 0,
        "amp": True,  # bf16 autocast on CUDA
        # ... and on a CPU run too: ~1.5x faster steps where the CPU has AVX-512 BF16
        # (Zen 4, Sapphire Rapids); a CPU without native bf16 trains in float32 and says
        # so (pipeline.loop.cpu_bf16_autocast). Off by default.
        "amp_on_cpu": False,
        "channels_last": True,
        "log_every": 50,
        "eval_every": 0,  # steps between evaluations, 0 = only at the end
        "checkpoint_every": 1000,
        "num_to_keep": 2,
        "max_failures": 3,
        "storage_path": None,  # local dir or pyarrow URI; default <out>/ray
        "run_name": None,  # default <name>; same name + storage_path resumes
    },
    "image": {
        "size": 224,
        "mean": list(IMAGENET_MEAN),  # lists, as YAML gives them
        "std": list(IMAGENET_STD),
        "augment": True,
    },
    "eval": {
        "batch_size": 128,  # gallery images per forward pass
        "query_batch_size": None,  # queries per scoring block; None = 1024 on a GPU, else batch_size
        "eval_set": None,  # None = the manifest's first evaluation set
        "rerank_top": 50,  # CCNet: candidates re-ranked by the correction network
        "grid_png": None,  # path of a result-grid image, None = none
        "at_end": True,  # evaluate after the last step (the bench turns it off)
        # The gallery decoded once onto the device for every evaluation of a run
        # (pipeline.gallery_cache): none | device | auto (= device when it fits).
        "image_cache": "auto",
    },
}

OPEN_SECTIONS = ("model", "loss", "demo_settings", "paper_settings", "fault_injection", "tune")
SWITCHES = ("paper", "demo")  # switch -> "<switch>_settings", merged in this order
BASE_KEY = "base"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "exponential", "constant")


class ConfigError(ValueError):
    """A config file or override is malformed or names an unknown key."""


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; configs mean a float."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: no arbitrary objects


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in; nested dicts merge, others replace."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file merged over its ``base:`` chain (not over ``DEFAULTS``)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    if not path.is_file():
        where = f" (base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file {path} not found{where}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a file name, got {base!r}")
    parent = read_config_file(path.parent / base, (*_chain, path))
    return deep_merge(parent, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> ``(["optim", "lr"], 0.1)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return key.split("."), value


def set_dotted(config: dict, keys: list[str], value: Any, source: str) -> None:
    """Set ``config[k1][k2]... = value``; unknown keys in closed sections are errors."""
    node = config
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            if key in OPEN_SECTIONS and node.get(key) is None:
                node[key] = {}
            else:
                path = ".".join(keys[: depth + 1])
                raise ConfigError(f"{source}: {path!r} is not a section of the config")
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings in order (the last one wins)."""
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(config, keys, value, source=f"--set {text}")
    return config


def check_keys(config: dict, reference: dict, where: str) -> None:
    """Every key of ``config`` must exist in ``reference`` (closed sections recursively)."""
    for key, value in config.items():
        path = f"{where}.{key}" if where else key
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(reference))
            raise ConfigError(f"unknown config key {path!r}{hint} (known: {known})")
        if key in OPEN_SECTIONS and not where:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            continue
        if isinstance(reference[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            check_keys(value, reference[key], path)


def validate_config(config: dict) -> None:
    """Unknown keys and out-of-range values raise ``ConfigError`` naming the key."""
    check_keys(config, DEFAULTS, "")
    if not config["model"].get("name"):
        raise ConfigError("model.name is required")
    if not config["loss"].get("name"):
        raise ConfigError("loss.name is required")
    optim, train = config["optim"], config["train"]
    if optim["name"] not in OPTIMIZERS:
        raise ConfigError(f"optim.name {optim['name']!r}, expected one of {OPTIMIZERS}")
    if optim["schedule"] not in SCHEDULES:
        raise ConfigError(f"optim.schedule {optim['schedule']!r}, expected one of {SCHEDULES}")
    decay = optim["decay_steps"]
    if decay != "epoch" and not (isinstance(decay, int) and decay > 0):
        raise ConfigError(f"optim.decay_steps must be a positive int or 'epoch', got {decay!r}")
    for key in ("steps", "batch_size"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive int, got {train[key]!r}")
    limit = train["time_limit_s"]
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
    ):
        raise ConfigError(f"train.time_limit_s must be a positive number or null, got {limit!r}")
    if not isinstance(train["workers"], int) or train["workers"] < 0:
        raise ConfigError(f"train.workers must be an int >= 0, got {train['workers']!r}")
    if train["use_gpu"] not in ("auto", True, False):
        raise ConfigError(f"train.use_gpu must be auto, true or false, got {train['use_gpu']!r}")
    per_group = train["triplets_per_group"]
    if isinstance(per_group, bool) or not isinstance(per_group, int) or per_group < 1:
        raise ConfigError(f"train.triplets_per_group must be an int >= 1, got {per_group!r}")
    if train["batch_size"] % per_group:
        raise ConfigError(
            f"train.batch_size ({train['batch_size']}) must be a multiple of "
            f"train.triplets_per_group ({per_group}), so every batch holds whole runs"
        )
    for section in ("train", "eval"):  # the training images' cache and the gallery's
        mode = config[section]["image_cache"]
        if mode not in ("none", "device", "auto"):
            raise ConfigError(f"{section}.image_cache must be none, device or auto, got {mode!r}")
    budget = train["image_cache_gb"]
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
    ):
        raise ConfigError(f"train.image_cache_gb must be a positive number or null, got {budget!r}")
    if train["step_graph"] not in ("auto", True, False):
        raise ConfigError(
            f"train.step_graph must be auto, true or false, got {train['step_graph']!r}"
        )
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if not isinstance(train[key], int) or train[key] < 0:
            raise ConfigError(f"train.{key} must be an int >= 0, got {train[key]!r}")
    if not isinstance(train["num_to_keep"], int) or train["num_to_keep"] < 1:
        raise ConfigError(f"train.num_to_keep must be an int >= 1, got {train['num_to_keep']!r}")
    size = config["image"]["size"]
    if not isinstance(size, int) or size < 32:
        raise ConfigError(f"image.size must be an int >= 32, got {size!r}")
    fault = config["fault_injection"]
    if fault is not None and not isinstance(fault.get("step"), int):
        raise ConfigError(f"fault_injection must be {{step: int, rank: int}}, got {fault!r}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """``DEFAULTS`` <- YAML file (with its ``base:`` chain) <- switched settings (paper,
    then demo) <- overrides.

    Returns the validated config; ``resolve_run_paths`` fills the run paths.
    """
    file_config = read_config_file(path) if path is not None else {}
    config = deep_merge(DEFAULTS, file_config)
    config = apply_overrides(config, list(overrides))
    for switch in SWITCHES:
        if config.get(switch):
            settings = config.get(f"{switch}_settings") or {}
            config = apply_overrides(deep_merge(config, settings), list(overrides))
    validate_config(config)
    return config


def resolve_run_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Fill ``out`` (default ``runs/<name>``), ``train.run_name`` and ``train.storage_path``
    (default ``<out>/ray``) with absolute paths, so workers on any node agree."""
    config = copy.deepcopy(config)
    if not config.get("data"):
        raise ConfigError("no dataset: set 'data' in the config or pass --data DIR")
    if "://" not in str(config["data"]):
        config["data"] = str(Path(config["data"]).resolve())
    out = Path(config["out"] or Path("runs") / config["name"]).resolve()
    config["out"] = str(out)
    train = config["train"]
    train["run_name"] = train["run_name"] or config["name"]
    storage = train["storage_path"] or out / "ray"
    train["storage_path"] = storage if "://" in str(storage) else str(Path(storage).resolve())
    return config


def dump_config(config: dict[str, Any]) -> str:
    """YAML text of a resolved config (the ``config.yaml`` written next to a run)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
