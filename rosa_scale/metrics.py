"""Run metrics to JSONL (always) and TensorBoard (when installed), from the main process only.

Every line is valid JSON: a NaN or infinite value is written as ``null``. A fresh run starts the
file anew; a resumed run keeps the records up to its checkpoint's step (later ones belonged to the
part of the run that was lost) and appends.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _keep_through(path: Path, step: int) -> None:
    """Drop the records after ``step`` (atomically: a temp file renamed over the old one)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by a kill
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, output_dir: str | Path, enabled: bool = True, resumed_at: int | None = None,
                 tensorboard: bool = True, forward=None):
        """``forward(values, step=)`` also receives each record's finite numbers (``Accelerator.log``)."""
        self.enabled = enabled
        self._tb, self._forward = None, forward
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        if resumed_at is None:
            self._file = self.path.open("w", encoding="utf-8")
        else:
            _keep_through(self.path, resumed_at)
            self._file = self.path.open("a", encoding="utf-8")
        if not tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        except ImportError:
            self._tb = None

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _finite(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._forward is not None and numbers:
            self._forward(numbers, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
