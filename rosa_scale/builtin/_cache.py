"""Cache location, locking and atomic writes shared by the built-in defaults.

Several processes (the ranks of one distributed run) may ask for the same artifact at
once, and a build may be killed half-way. So each artifact is built under a file lock
in a temporary sibling and renamed into place only when complete: a path that exists
is always whole.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$ROSA_SCALE_CACHE``, else ``~/.cache/rosa_scale``."""
    root = cache_dir or os.environ.get("ROSA_SCALE_CACHE") or "~/.cache/rosa_scale"
    return Path(root).expanduser()


def _tmp_sibling(path: Path) -> Path:
    # Created with mkdir()/open("x"), not tempfile, so the result keeps the umask's permissions.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def cached_dir(name: str, build: Callable[[Path], None], cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/<name>``, made once by ``build(empty_dir)`` and renamed into place."""
    root = cache_root(cache_dir)
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = _tmp_sibling(final)
        tmp.mkdir()
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """Write to a temporary sibling of ``path``; replace ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
