"""Train a composed-retrieval model: ``python pipeline/train.py --config configs/<name>.yaml``.

The script that ``ray job submit --working-dir . -- python pipeline/train.py ...`` runs:
it parses the shared flags (``pipeline.cli_flags``) and calls ``pipeline.launch.run``.
With ``train.workers >= 1`` the loop runs under Ray Train (joining a running cluster or
starting a local one); ``--workers 0`` runs it in this process without Ray. Rerunning
the same command (same run name and storage path) resumes from the newest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (``python pipeline/train.py``) Python puts pipeline/ on sys.path, not
# the repository root: swap it for the root so ``import pipeline`` finds the package and
# pipeline's modules (data.py, config.py, ...) do not shadow top-level names. Nothing
# imports this file; the library is pipeline.launch and pipeline.cli_flags.
_SCRIPT_DIR, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _SCRIPT_DIR]
sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402

from pipeline.cli_flags import add_common_flags, config_from_args  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.launch import configure_logging, recall_table, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args)
    except ConfigError as err:
        parser.error(str(err))
    metrics = run(config)
    print(
        f"run {config['train']['run_name']}: {config['model']['name']} on {config['data']}, "
        f"{metrics.get('step')} steps -> {config['out']}"
    )
    print(recall_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
