"""Search spaces: a run config's ``tune:`` section -> Ray Tune sampling domains.

The section maps dotted config keys to distributions (a nested form, ``tune: {optim:
{lr: {type: ...}}}``, is read the same way)::

    tune:
      optim.lr: {type: loguniform, low: 1.0e-3, high: 0.1}     # floats, log scale
      model.dropout: {type: uniform, low: 0.0, high: 0.5}      # floats, linear scale
      model.hidden_dim: {type: randint, low: 256, high: 1025}  # ints, high excluded
      model.learn_weights: {type: choice, values: [true, false]}  # one value at random
      optim.name: {type: grid, values: [sgd, adam]}            # every value, each num_samples times

A key must name a key of the resolved run config, a keyword argument of the configured
model's constructor (``model.*``) or of the loss (``loss.*``). When the section is
absent the model's default space is searched (``default_space``): for the TIRG family
the initial gate/residual weights ``w_g``/``w_r`` (log-uniform around the code's 1 and
10), whether they are learned, lr and weight decay; for CCNet lr, hidden size (its
expert dimension ``model.expert_dim``: half, same, double) and dropout; for other models
lr and weight decay. The lr range is a decade either side of the config's lr.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, set_dotted, validate_config

SPACE_SECTION = "tune"
NUMERIC_TYPES = ("loguniform", "uniform", "randint")
LIST_TYPES = ("choice", "grid")
PARAM_TYPES = NUMERIC_TYPES + LIST_TYPES


class SearchSpaceError(ValueError):
    """A ``tune:`` entry has an unknown type, a bad range or names an unknown config key."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key and its distribution."""

    key: str  # dotted config key, e.g. "optim.lr"
    type: str  # one of PARAM_TYPES
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()

    def domain(self) -> Any:
        """The Ray Tune domain (``tune.loguniform(...)``, ``tune.grid_search([...])``, ...)."""
        from ray import tune

        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "randint":
            return tune.randint(self.low, self.high)
        if self.type == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def probe_values(self) -> list[Any]:
        """Values that must each give a valid run config (both ends of a range, every choice)."""
        if self.type in LIST_TYPES:
            return list(self.values)
        if self.type == "randint":
            return [self.low, self.high - 1]
        return [float(self.low), float(self.high)]  # sampled as floats, even from int bounds

    def describe(self) -> str:
        if self.type in LIST_TYPES:
            return f"{self.type}{list(self.values)}"
        return f"{self.type}[{self.low:g}, {self.high:g}]"


def flatten_section(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{optim: {lr: {type: ...}}}`` and ``{"optim.lr": {type: ...}}`` -> the latter."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and "type" not in value:
            if not value:
                raise SearchSpaceError(
                    f"{SPACE_SECTION}.{dotted}: empty mapping, expected "
                    f"{{type: ..., ...}} or nested config keys"
                )
            flat.update(flatten_section(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _number(key: str, name: str, value: Any, integer: bool) -> float | int:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        expected = "an int" if integer else "a finite number"
        raise SearchSpaceError(f"{SPACE_SECTION}.{key}: '{name}' must be {expected}, got {value!r}")
    return value


def parse_param(key: str, spec: Any) -> ParamSpec:
    """Validate one entry; errors name the key and what was expected."""
    where = f"{SPACE_SECTION}.{key}"
    if not isinstance(spec, dict):
        raise SearchSpaceError(
            f"{where}: expected a mapping like {{type: loguniform, low: ..., "
            f"high: ...}}, got {spec!r}"
        )
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SearchSpaceError(f"{where}: unknown type {kind!r}, expected one of {PARAM_TYPES}")
    allowed = {"type", "values"} if kind in LIST_TYPES else {"type", "low", "high"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SearchSpaceError(
            f"{where}: unexpected field(s) {extra} for type {kind!r}; expected {sorted(allowed)}"
        )
    if kind in LIST_TYPES:
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(
                f"{where}: type {kind!r} needs a non-empty list 'values', got {values!r}"
            )
        return ParamSpec(key, kind, values=tuple(values))
    for name in ("low", "high"):
        if name not in spec:
            raise SearchSpaceError(f"{where}: type {kind!r} needs 'low' and 'high'")
    low = _number(key, "low", spec["low"], integer=kind == "randint")
    high = _number(key, "high", spec["high"], integer=kind == "randint")
    if low >= high:
        raise SearchSpaceError(f"{where}: low ({low!r}) must be < high ({high!r})")
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}: loguniform needs low > 0, got {low!r}")
    return ParamSpec(key, kind, low=low, high=high)


def parse_space(section: dict[str, Any]) -> dict[str, ParamSpec]:
    """A ``tune:`` section -> ``{dotted key: ParamSpec}`` (not yet checked against a config)."""
    if not isinstance(section, dict) or not section:
        raise SearchSpaceError(
            f"'{SPACE_SECTION}' must be a non-empty mapping of config keys to "
            f"distributions, got {section!r}"
        )
    return {key: parse_param(key, spec) for key, spec in flatten_section(section).items()}


def loss_kwargs() -> list[str]:
    """Keyword arguments of the training loss (``pipeline.losses.compute_loss``)."""
    from pipeline.losses import compute_loss

    params = inspect.signature(compute_loss).parameters.values()
    return [p.name for p in params if p.kind == p.KEYWORD_ONLY]


def known_key(config: dict[str, Any], key: str) -> bool:
    """Whether ``key`` names a run-config key (or a model/loss keyword argument)."""
    parts = key.split(".")
    if parts[0] == SPACE_SECTION:
        return False
    node: Any = config
    for part in parts[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return False
        node = node[part]
    if parts[-1] in node:
        return True
    if len(parts) == 2 and parts[0] == "model":
        from pipeline.models import accepted_kwargs

        return parts[-1] in accepted_kwargs(config["model"]["name"])
    return len(parts) == 2 and parts[0] == "loss" and parts[-1] in loss_kwargs()


def check_space(space: dict[str, ParamSpec], config: dict[str, Any]) -> None:
    """Every key must be a config key, and every probe value must give a valid config."""
    for key, spec in space.items():
        if not known_key(config, key):
            raise SearchSpaceError(
                f"{SPACE_SECTION}.{key}: unknown config key {key!r} (not in the run config, "
                f"and not a keyword of model {config['model']['name']!r} or of the loss)"
            )
        for value in spec.probe_values():
            try:
                apply_params(config, {key: value})
            except ConfigError as err:
                raise SearchSpaceError(
                    f"{SPACE_SECTION}.{key} = {value!r} (from "
                    f"{spec.describe()}) is not a valid value: {err}"
                ) from err


def default_space(config: dict[str, Any]) -> dict[str, ParamSpec]:
    """The model family's default space (module docstring), lr centred on the config's."""
    from pipeline.models import accepted_kwargs

    model = config["model"]["name"]
    accepted = set(accepted_kwargs(model))
    lr = float(config["optim"]["lr"])
    space = {"optim.lr": ParamSpec("optim.lr", "loguniform", low=lr / 10, high=lr * 10)}
    if {"w_g_init", "w_r_init", "learn_weights"} <= accepted:
        # TIRG Eq. 1: w_g, w_r start at 1 and 10 in the authors' code
        space["model.w_g_init"] = ParamSpec("model.w_g_init", "loguniform", low=0.1, high=10.0)
        space["model.w_r_init"] = ParamSpec("model.w_r_init", "loguniform", low=1.0, high=100.0)
        space["model.learn_weights"] = ParamSpec(
            "model.learn_weights", "choice", values=(True, False)
        )
    if model == "ccnet":
        # CCNet's hidden size is its expert dimension D (the query is 7 D)
        size = int(config["model"]["expert_dim"])
        space["model.expert_dim"] = ParamSpec(
            "model.expert_dim", "choice", values=(size // 2, size, size * 2)
        )
        space["model.dropout"] = ParamSpec("model.dropout", "uniform", low=0.0, high=0.5)
    else:
        space["optim.weight_decay"] = ParamSpec(
            "optim.weight_decay", "loguniform", low=1e-7, high=1e-4
        )
    return space


def search_space(config: dict[str, Any]) -> dict[str, ParamSpec]:
    """The config's ``tune:`` section if it has one, else ``default_space``; checked."""
    section = config.get(SPACE_SECTION)
    space = parse_space(section) if section else default_space(config)
    check_space(space, config)
    return space


def plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python numbers, so configs dump as plain YAML."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def apply_params(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``{dotted key: value}`` set, validated (``ConfigError``)."""
    config = copy.deepcopy(config)
    for key, value in params.items():
        set_dotted(config, key.split("."), plain(value), source=f"{SPACE_SECTION}.{key}")
    validate_config(config)
    return config
