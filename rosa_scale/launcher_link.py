"""What a training process tells the launch/ scripts that started it, through ``ROSA_LAUNCH_DIR``.

torchrun and accelerate start each worker in a session of its own, so a signal sent to the
launcher's process group never reaches them, and they report any non-zero worker exit as 1.
A launcher therefore makes a folder and exports ``ROSA_LAUNCH_DIR``; each worker writes
``worker-<pid>`` there (the launcher forwards SIGTERM/SIGUSR1 to those PIDs) and ``started``,
and, when it stops on a signal with its checkpoint saved, ``resumable`` (the launcher then
exits 75).

Under a launcher a worker also treats SIGINT and SIGHUP as SIGTERM (a Ctrl-C or a hang-up that
reaches it, e.g. passed on by a torchrun that handles them, stops it with a checkpoint, not a
traceback), and a SIGTERM/SIGUSR1 that arrives before rosa-train's own handler
(``preemption.PreemptionWatch``) is installed is handed to it once it is, instead of killing the
process; one that arrives after that handler was removed again (the run is over) is ignored.
Without the variable none of this happens.

Any torch elastic worker (torchrun, accelerate launch), launcher or not, asks Linux for SIGTERM
when its agent dies (``PR_SET_PDEATHSIG``): a SIGKILLed agent leaves no worker training orphaned;
each one stops at its next step with a checkpoint instead.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from pathlib import Path

ENV = "ROSA_LAUNCH_DIR"
RESUMABLE = 75  # EX_TEMPFAIL, as rosa_scale.preemption.RESUMABLE_EXIT
_STOPS = (signal.SIGTERM, signal.SIGUSR1)  # what PreemptionWatch handles
_LIKE_SIGTERM = (signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_pending: list[int] = []  # stop signals received before PreemptionWatch took over
_watch_seen = threading.Event()  # set once something else handles SIGTERM (PreemptionWatch)
_registered_pid = None  # processes forked from the worker (a data loader's) keep the default signals


def _folder() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def register() -> None:
    """Announce this process as a worker the launcher should forward signals to, and make the
    signals a launcher or torchrun passes on stop it gracefully (see the module docstring)."""
    global _registered_pid
    _stop_when_agent_dies()
    folder = _folder()
    if folder is None or not folder.is_dir():
        return
    _registered_pid = os.getpid()
    if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
        for sig in _STOPS:
            signal.signal(sig, _on_stop)
        for sig in _LIKE_SIGTERM:
            signal.signal(sig, _as_sigterm)
        threading.Thread(target=_hand_over, name="rosa-launch-link", daemon=True).start()
    mark = folder / f"worker-{os.getpid()}"
    mark.write_text(f"{os.getpid()}\n")
    atexit.register(lambda: mark.unlink(missing_ok=True))
    (folder / "started").touch()


def mark_resumable() -> None:
    """Say that this run stopped on a signal after saving a checkpoint (exit status 75)."""
    folder = _folder()
    if folder is None or not folder.is_dir():
        return
    tmp = folder / f".resumable.tmp-{os.getpid()}"
    tmp.write_text(f"{RESUMABLE}\n")
    os.replace(tmp, folder / "resumable")


def _on_stop(signum: int, frame) -> None:
    """SIGTERM/SIGUSR1 while PreemptionWatch is not installed: keep it for the watch, or, once the
    watch has come and gone (the run is finishing), ignore it."""
    if os.getpid() != _registered_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    elif not _watch_seen.is_set():
        _pending.append(signum)


def _as_sigterm(signum: int, frame) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _hand_over() -> None:
    """Wait for PreemptionWatch to take SIGTERM over, then pass it any stop already asked for."""
    while signal.getsignal(signal.SIGTERM) is _on_stop:
        time.sleep(0.1)
    _watch_seen.set()
    if _pending:
        os.kill(os.getpid(), _pending[0])


def _stop_when_agent_dies() -> None:
    """Linux, torch elastic workers: SIGTERM to this process when the agent that started it exits.
    The agent outlives its workers unless it is killed outright (SIGKILL, out of memory)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass
