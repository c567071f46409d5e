"""Partial output directories: ``OUT.partial-<pid>``, renamed to ``OUT`` when complete.

The shard writer and the export stage write into a partial directory so that a killed
run never leaves something that looks finished. A killed run cannot remove its own
partial directory, so the next writer of the same ``OUT`` does: ``claim_partial_dir``
removes every ``OUT.partial-<pid>`` whose process is gone, says so in the log, and
makes its own. A partial directory holds a ``.partial-owner`` file naming the host
that writes it; on shared storage the partials of other hosts are left alone (their
pids mean nothing here). ``release_owner_file`` takes that file out before the rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = ".partial-owner"


def partial_dir(out_dir: str | Path, pid: int | None = None) -> Path:
    """``OUT.partial-<pid>`` beside ``out_dir`` (this process's by default)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.partial-{os.getpid() if pid is None else pid}"


def claim_partial_dir(out_dir: str | Path) -> Path:
    """Remove stale partials of ``out_dir``, then create this process's (empty) one."""
    remove_stale_partials(out_dir)
    tmp = partial_dir(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / OWNER_FILE).write_text(socket.gethostname())
    return tmp


def release_owner_file(tmp: Path) -> None:
    """Take the owner file out of a finished partial directory, before it is renamed."""
    (Path(tmp) / OWNER_FILE).unlink(missing_ok=True)


def remove_stale_partials(out_dir: str | Path) -> list[Path]:
    """Remove ``OUT.partial-<pid>`` directories of processes that are gone; returns them.

    Kept: this process's own, those of live processes, and those another host owns.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    prefix = f"{out_dir.name}.partial-"
    removed = []
    for path in sorted(out_dir.parent.iterdir()):
        suffix = path.name[len(prefix) :] if path.name.startswith(prefix) else ""
        if not suffix.isdigit() or not path.is_dir() or int(suffix) == os.getpid():
            continue
        owner = _owner_host(path)
        if owner is not None and owner != socket.gethostname():
            log.info("left %s: another host (%s) writes it", path, owner)
            continue
        if _process_alive(int(suffix)):
            continue
        size = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        log.warning(
            "removed stale partial directory %s (%.1f MB; process %s is gone)",
            path,
            size / 1e6,
            suffix,
        )
        removed.append(path)
    return removed


def _owner_host(path: Path) -> str | None:
    try:
        return (path / OWNER_FILE).read_text().strip() or None
    except OSError:
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:
        return False
    return True


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
