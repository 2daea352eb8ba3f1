"""What a training process tells the launch/ scripts that started it, through ``ROSA_LAUNCH_DIR``.

torchrun and accelerate start each worker in a session of its own, so a signal sent to the
launcher's process group never reaches them, and they report any non-zero worker exit as 1.
A launcher therefore makes a folder and exports ``ROSA_LAUNCH_DIR``; each worker writes
``worker-<pid>`` there (the launcher forwards SIGTERM/SIGUSR1 to those PIDs) and, when it stops
after saving a checkpoint, ``resumable`` (the launcher then exits 75). Without the variable
these functions do nothing.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

ENV = "ROSA_LAUNCH_DIR"


def _folder() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def register() -> None:
    """Announce this process as a worker the launcher should forward signals to."""
    folder = _folder()
    if folder is None or not folder.is_dir():
        return
    mark = folder / f"worker-{os.getpid()}"
    mark.write_text(f"{os.getpid()}\n")
    atexit.register(lambda: mark.unlink(missing_ok=True))


def mark_resumable() -> None:
    """Say that this run stopped on a signal after saving a checkpoint (exit status 75)."""
    folder = _folder()
    if folder is None or not folder.is_dir():
        return
    tmp = folder / f".resumable.tmp-{os.getpid()}"
    tmp.write_text("75\n")
    os.replace(tmp, folder / "resumable")
