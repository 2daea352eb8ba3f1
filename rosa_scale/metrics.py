"""Run metrics to JSONL (always) and TensorBoard (when installed), from the main process only."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        except ImportError:
            self._tb = None

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
