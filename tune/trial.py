"""One Ray Tune trial: the sampled parameters applied to the run config, then the one
training loop (``pipeline.loop.train_loop``), run either

* in the trial's own process (``workers_per_trial == 0``), reporting through
  ``ray.tune.report`` via ``TuneContext``, checkpoints persisted by Tune in the trial
  directory; or
* as a Ray Train V2 run (``pipeline.launch.run_with_ray``: a ``TorchTrainer`` with
  ``workers_per_trial`` DDP workers), whose rank-0 reports reach Tune through
  ``ray.tune.integration.ray_train.TuneReportCallback``; checkpoints stay in the Train
  run's storage (``train.storage_path/train.run_name``), so a restored trial resumes
  from them.

Either way every report carries ``step`` and ``loss`` and, every ``train.eval_every``
steps, the protocol's recalls (``R@1`` ...), on which ASHA stops weak trials.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import dump_config
from pipeline.distributed import RunContext, pick_device
from tune.space import apply_params

log = logging.getLogger(__name__)


class TuneContext(RunContext):
    """The loop inside a Tune trial's process: one rank, reports to Tune."""

    def __init__(self, use_gpu: str | bool = "auto"):
        # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPU, so it is cuda:0 here
        self.device = pick_device(use_gpu)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        from ray import tune

        checkpoint = (
            None if checkpoint_dir is None else tune.Checkpoint.from_directory(str(checkpoint_dir))
        )
        tune.report(dict(metrics), checkpoint=checkpoint)  # persisted before it returns


def trial_config(
    base: dict[str, Any],
    params: dict[str, Any],
    *,
    trial_id: str,
    out_dir: str,
    train_storage: str,
    workers: int,
) -> dict[str, Any]:
    """The resolved run config of one trial: ``base`` (resolved) with ``params`` set, its
    own run directory ``out_dir/trials/<trial_id>`` and Train run name."""
    config = apply_params(base, params)
    config["out"] = str(Path(out_dir) / "trials" / trial_id)
    config["train"]["workers"] = int(workers)
    config["train"]["run_name"] = f"{config['name']}-{trial_id}"
    config["train"]["storage_path"] = train_storage
    return config


def run_trial(
    params: dict[str, Any],
    *,
    base_config: dict[str, Any],
    vocab: dict,
    out_dir: str,
    train_storage: str,
    workers: int,
) -> None:
    """Tune's trainable: the body of one trial (``params``: ``{dotted key: value}``)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(
        base_config,
        params,
        trial_id=trial_id,
        out_dir=out_dir,
        train_storage=train_storage,
        workers=workers,
    )
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("trial %s: %s", trial_id, params)
    if workers == 0:
        from pipeline.loop import train_loop

        train_loop(config, context=TuneContext(config["train"]["use_gpu"]), vocab=vocab)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.launch import run_with_ray

    run_with_ray(config, vocab, callbacks=[TuneReportCallback()])
