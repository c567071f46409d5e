"""Search-space parsing, resource arithmetic and the results table (no Ray cluster)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import DEFAULTS, deep_merge, load_config, validate_config
from tune.report import best_config, best_params, markdown_table, sort_table, trial_row
from tune.search import (
    SearchSetupError,
    concurrency,
    default_metric,
    fitting_trials,
    make_searcher,
    trial_resources,
)
from tune.space import (
    ParamSpec,
    SearchSpaceError,
    apply_params,
    default_space,
    parse_space,
    search_space,
)


def tirg_config(**tune_section) -> dict:
    config = deep_merge(DEFAULTS, {"model": {"name": "tirg"}})
    if tune_section:
        config["tune"] = tune_section
    validate_config(config)
    return config


def test_section_parses_every_type_flat_and_nested():
    space = parse_space(
        {
            "optim.lr": {"type": "loguniform", "low": 1e-3, "high": 0.1},
            "model": {"dropout": {"type": "uniform", "low": 0.0, "high": 0.5}},
            "train.batch_size": {"type": "randint", "low": 8, "high": 33},
            "model.learn_weights": {"type": "choice", "values": [True, False]},
            "optim.name": {"type": "grid", "values": ["sgd", "adam"]},
        }
    )
    assert list(space) == [
        "optim.lr",
        "model.dropout",
        "train.batch_size",
        "model.learn_weights",
        "optim.name",
    ]
    assert space["model.dropout"] == ParamSpec("model.dropout", "uniform", low=0.0, high=0.5)
    assert space["train.batch_size"].probe_values() == [8, 32]
    assert space["optim.name"].domain() == {"grid_search": ["sgd", "adam"]}
    lr = space["optim.lr"].domain().sample()
    assert 1e-3 <= lr < 0.1


@pytest.mark.parametrize(
    "section, message",
    [
        ({"optim.lr": {"type": "logarithmic", "low": 1, "high": 2}}, "unknown type 'logarithmic'"),
        ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 0.1}}, "low (0.1) must be < high"),
        ({"optim.lr": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "loguniform needs low > 0"),
        ({"optim.lr": {"type": "uniform", "low": 0.1}}, "needs 'low' and 'high'"),
        ({"optim.lr": {"type": "uniform", "low": "a", "high": 1}}, "'low' must be a finite number"),
        ({"train.steps": {"type": "randint", "low": 1.5, "high": 4}}, "'low' must be an int"),
        ({"optim.name": {"type": "choice", "values": []}}, "non-empty list 'values'"),
        (
            {"optim.lr": {"type": "uniform", "low": 0, "high": 1, "q": 2}},
            "unexpected field(s) ['q']",
        ),
        ({"optim.lr": 0.1}, "expected a mapping"),
    ],
)
def test_bad_entries_are_clear_errors(section, message):
    with pytest.raises(SearchSpaceError) as err:
        parse_space(section)
    assert message in str(err.value)
    assert "tune.optim" in str(err.value) or "tune.train" in str(err.value)


@pytest.mark.parametrize(
    "key", ["optim.learning_rate", "model.w_x_init", "trian.steps", "optim.lr.value", "loss.margin"]
)
def test_unknown_config_key_is_an_error(key):
    config = tirg_config(**{key: {"type": "uniform", "low": 0.1, "high": 1.0}})
    with pytest.raises(SearchSpaceError, match=f"unknown config key '{key}'"):
        search_space(config)


def test_model_and_loss_keywords_are_known_keys():
    config = tirg_config(
        **{
            "model.w_g_init": {"type": "loguniform", "low": 0.1, "high": 10},
            "loss.negatives_per_anchor": {"type": "choice", "values": [3, 8]},
        }
    )
    assert list(search_space(config)) == ["model.w_g_init", "loss.negatives_per_anchor"]


def test_values_the_run_config_rejects_are_errors():
    config = tirg_config(**{"optim.name": {"type": "choice", "values": ["sgd", "rmsprop"]}})
    with pytest.raises(SearchSpaceError, match=r"optim.name = 'rmsprop'.*expected one of"):
        search_space(config)
    config = tirg_config(**{"train.batch_size": {"type": "uniform", "low": 8, "high": 32}})
    with pytest.raises(SearchSpaceError, match="train.batch_size must be a positive int"):
        search_space(config)


def test_default_space_of_tirg_centres_lr_on_the_config():
    config = tirg_config()
    config["optim"]["lr"] = 0.02
    space = default_space(config)
    assert set(space) == {
        "optim.lr",
        "optim.weight_decay",
        "model.w_g_init",
        "model.w_r_init",
        "model.learn_weights",
    }
    assert (space["optim.lr"].low, space["optim.lr"].high) == pytest.approx((0.002, 0.2))
    w_g, w_r = space["model.w_g_init"], space["model.w_r_init"]
    assert w_g.low < 1 < w_g.high and w_r.low < 10 < w_r.high  # the code's 1 and 10
    assert search_space(config) == space  # no tune section -> the default, checked


def test_default_space_without_tirg_weights():
    config = deep_merge(DEFAULTS, {"model": {"name": "concat"}})
    assert set(default_space(config)) == {"optim.lr", "optim.weight_decay"}


def test_default_space_of_ccnet_is_lr_hidden_size_dropout():
    config = load_config("configs/fashioniq_ccnet.yaml")
    space = search_space(config)
    assert set(space) == {"optim.lr", "model.expert_dim", "model.dropout"}
    assert space["model.expert_dim"].values == (512, 1024, 2048)
    assert space["optim.lr"].low == pytest.approx(1e-5)


def test_apply_params_sets_nested_keys_as_plain_values():
    import numpy as np

    config = apply_params(
        tirg_config(),
        {
            "optim.lr": np.float64(0.5),
            "model.learn_weights": np.bool_(False),
            "train.batch_size": np.int64(8),
        },
    )
    assert config["optim"]["lr"] == 0.5 and type(config["optim"]["lr"]) is float
    assert config["model"]["learn_weights"] is False
    assert type(config["train"]["batch_size"]) is int
    yaml.safe_dump(config)  # plain YAML, no numpy tags


def test_shipped_configs_have_valid_default_spaces():
    for name in ("css_tirg", "fashioniq_tirg", "css_concat"):
        config = load_config(f"configs/{name}.yaml")
        assert "optim.lr" in search_space(config)


def test_resources_in_process_and_with_train_workers():
    train = {"cpus_per_worker": 0.9, "gpus_per_worker": 1.0}
    assert trial_resources(train, 0, False, 0.2) == (
        {"CPU": 0.9, "GPU": 0.0},
        {"CPU": 0.9, "GPU": 0.0},
    )
    trial, need = trial_resources(train, 2, True, 0.2)
    assert trial == {"CPU": 0.2, "GPU": 0.0}
    assert need == pytest.approx({"CPU": 2.0, "GPU": 2.0})
    # 2 CPUs: a 0.2-CPU trial driving a 0.9-CPU worker -> one at a time; 0.8 -> two
    assert fitting_trials({"CPU": 2.0}, {"CPU": 1.1, "GPU": 0.0}) == 1
    assert fitting_trials({"CPU": 2.0}, {"CPU": 1.0, "GPU": 0.0}) == 2
    # GPU cluster: 8 GPUs, 2 per trial -> 4, whatever the CPUs allow beyond that
    assert fitting_trials({"CPU": 64.0, "GPU": 8.0}, need) == 4


def test_concurrency_is_bounded_by_what_fits():
    need, cluster = {"CPU": 1.1, "GPU": 0.0}, {"CPU": 2.0}
    assert concurrency(None, 1, need, cluster) == 1
    assert concurrency(4, 1, need, cluster) == 1
    assert concurrency(1, 3, need, cluster) == 1
    with pytest.raises(ValueError, match="one trial needs"):
        concurrency(None, 0, {"CPU": 4.0, "GPU": 0.0}, cluster)
    # a joined (autoscaling) cluster with no GPU node up yet: an explicit limit is kept
    gpu_need, head_only = {"CPU": 1.0, "GPU": 2.0}, {"CPU": 0.0}
    assert concurrency(4, 0, gpu_need, head_only, joined=True) == 4
    with pytest.raises(ValueError, match="pass --max-concurrent"):
        concurrency(None, 0, gpu_need, head_only, joined=True)


def history(steps, recalls, done):
    return pd.DataFrame(
        {"step": steps, "R@1": recalls, "done": [False] * (len(steps) - 1) + [done]}
    )


def test_trial_rows_status_and_last_evaluated_metric():
    kw = {"metric": "R@1", "mode": "max", "max_steps": 4}
    done = trial_row(
        "a", {"optim.lr": 0.1}, history([2, 3, 4], [10.0, math.nan, 20.0], True), None, **kw
    )
    assert done == {
        "trial_id": "a",
        "optim.lr": 0.1,
        "R@1": 20.0,
        "best_R@1": 20.0,
        "step": 4,
        "iterations": 3,
        "status": "completed",
    }
    stopped = trial_row("b", {"optim.lr": 9.0}, history([2, 3], [30.0, math.nan], True), None, **kw)
    assert (stopped["R@1"], stopped["step"], stopped["status"]) == (30.0, 3, "stopped")
    assert trial_row("c", {"optim.lr": 1.0}, None, RuntimeError("x"), **kw)["status"] == "error"
    assert (
        trial_row("d", {"optim.lr": 1.0}, history([2], [5.0], False), None, **kw)["status"]
        == "unfinished"
    )
    stopped_lower = trial_row(
        "e", {"optim.lr": 5.0}, history([2, 3], [25.0, math.nan], True), None, **kw
    )
    errored = trial_row("c", {"optim.lr": 1.0}, None, RuntimeError("x"), **kw)
    table = sort_table(pd.DataFrame([stopped_lower, done, stopped, errored]), "R@1", "max")
    # the trial ASHA let finish ranks above higher values that stopped trials had earlier
    assert list(table["trial_id"]) == ["a", "b", "e", "c"]
    assert best_params(table, {"optim.lr": None}, "R@1") == {"optim.lr": 0.1}
    lines = markdown_table(table).splitlines()
    assert lines[0].startswith("| trial_id | optim.lr | R@1 |") and len(lines) == 6


def test_best_config_loads_back_with_the_searched_values(tmp_path):
    base = load_config(
        "configs/css_tirg.yaml", ["demo=true", "data=/data/css", "out=/x/y", "train.run_name=r"]
    )
    config = best_config(base, {"optim.lr": 0.123, "model.learn_weights": False})
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    # demo settings (lr 0.05) are not merged again over the searched lr
    assert loaded["optim"]["lr"] == 0.123 and loaded["model"]["learn_weights"] is False
    assert loaded["out"] is None and loaded["train"]["run_name"] is None
    assert loaded["train"]["steps"] == base["train"]["steps"] and loaded["tune"] is None


@pytest.mark.parametrize(
    "protocol, metric",
    [
        ({"name": "css", "ks": [1, 5, 10, 50], "hit": "label", "exclude_reference": True}, "R@1"),
        ({"name": "fashioniq", "ks": [50, 10], "hit": "id", "exclude_reference": True}, "avg/R@10"),
    ],
)
def test_default_metric_is_the_protocols_first_recall(tmp_path, protocol, metric):
    from shard_fixtures import write_dataset

    data = write_dataset(
        tmp_path / "ds", explicit_groups=1, derived_groups=False, protocol=protocol
    )
    config = deep_merge(DEFAULTS, {"data": str(data)})
    assert default_metric(config) == metric


def test_optuna_refuses_grid_entries():
    space = parse_space({"optim.name": {"type": "grid", "values": ["sgd", "adam"]}})
    with pytest.raises(SearchSetupError, match="does not take grid entries"):
        make_searcher("optuna", "R@1", 0, 1, space)


@pytest.mark.parametrize(
    "config_file, cadence", [("configs/tune_css_tirg.yaml", 20), ("configs/css_tirg.yaml", 20)]
)
def test_a_shortened_search_evaluates_within_its_steps(tmp_path, caplog, config_file, cadence):
    """``--steps 60`` on a config made for long trials: the evaluation cadence and ASHA's
    grace period follow the steps (they used to exit 2: grace period 2000 / 10000 must
    be in [1, max_t=60]), and the log says what they became."""
    pytest.importorskip("ray")
    from shard_fixtures import write_dataset

    from tune.search import load_search_config, make_scheduler, parse_args

    data = write_dataset(tmp_path / "shards", explicit_groups=4)
    root = Path(__file__).resolve().parent.parent
    args = parse_args(
        [
            "--config",
            str(root / config_file),
            "--data",
            str(data),
            "--steps",
            "60",
            "--num-samples",
            "3",
            "--out",
            str(tmp_path / "search"),
        ]
    )
    with caplog.at_level("WARNING", logger="tune.search"):
        config, _ = load_search_config(args)
    assert config["train"]["eval_every"] == cadence
    assert config["train"]["checkpoint_every"] <= 60
    scheduler = make_scheduler("asha", config, args)
    rungs = sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)
    assert rungs[0] == cadence and scheduler._max_t == 60  # the first rung: the grace period
    assert any(f"evaluate every {cadence} steps" in r.message for r in caplog.records)
