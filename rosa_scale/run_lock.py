"""One run per output directory: a lock file naming its holder, taken before anything is written.

Two runs writing into one folder would interleave metrics.jsonl and mix checkpoints of one with
the config of the other. The lock is a file holding the holder's PID and host, written under a
private name and hard-linked into place (atomic, and it fails if the lock exists, on local and
network file systems alike), so it is never seen empty. A lock whose process is gone (a crash,
SIGKILL) is stale: on the same host this is checked and the lock taken over; a lock held from
another host cannot be checked from here, so the message names it and how to remove it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

NAME = ".rosa-train.lock"


class OutputDirBusy(ValueError):
    """Another live run holds the output directory; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) and "pid" in value else None
    except (OSError, ValueError):
        return None


class OutputDirLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / NAME
        self.held = self.created = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises ``OutputDirBusy``."""
        self.created = not self.path.parent.exists()  # removed again if the run leaves it empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        note = None
        mine = self.path.with_name(f"{NAME}.{me['host']}-{me['pid']}.tmp")
        mine.write_text(json.dumps(me))
        try:
            for _ in range(5):  # a racing run may take over the same stale lock: the link decides
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    note = self._take_over_stale(me) or note
                    continue
                self.held = True
                return note
        finally:
            mine.unlink(missing_ok=True)
        raise OutputDirBusy(f"could not take the lock {self.path}: other runs keep taking it")

    def _take_over_stale(self, me: dict) -> str | None:
        """Remove a lock whose holder is gone (raises ``OutputDirBusy`` if it is alive or elsewhere)."""
        holder = self._holder()
        if holder is not None and (holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1)))):
            where = "" if holder.get("host") == me["host"] else f" on host {holder.get('host')}"
            raise OutputDirBusy(
                f"output_dir {self.path.parent} is in use by another run (PID {holder.get('pid')}{where}, "
                f"since {holder.get('started')}); choose another --output-dir, or delete {self.path} "
                "if no run is using it")
        stale = self.path.with_name(f"{NAME}.stale-{me['pid']}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return None
        moved = _read(stale)
        if moved != holder and moved is not None:  # a racing run took it over meanwhile: give it back
            try:
                os.link(stale, self.path)
            except FileExistsError:
                pass
        stale.unlink(missing_ok=True)
        return (f"took over the lock of a run that is gone (PID {holder.get('pid')})" if holder
                else f"replaced an unreadable lock file {self.path}")

    def _holder(self) -> dict | None:
        return _read(self.path)

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
            if self.created:  # a run refused before it wrote anything leaves no folder behind
                try:
                    self.path.parent.rmdir()
                except OSError:  # not empty: the run wrote into it
                    pass
        self.held = False

    close = release
