"""Learning-rate factor per optimizer step: warmup, decay, and an optional re-warmup per resample.

A pure function of the step, so a resumed run gets the same rate without extra state.
"""
from __future__ import annotations

import math


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
              resample_every: int | None = None, rewarm_steps: int = 0) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step ``step``."""
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / (warmup_steps + 1)
    elif schedule != "constant":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        factor = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    if resample_every:
        factor *= rewarm_factor(step, resample_every, rewarm_steps)
    return factor


def rewarm_factor(step: int, resample_every: int, rewarm_steps: int) -> float:
    """The re-warmup after each resample: the rate ramps up again over ``rewarm_steps`` steps."""
    since_resample = step % resample_every
    if rewarm_steps > 0 and step >= resample_every and since_resample < rewarm_steps:
        return (since_resample + 1) / (rewarm_steps + 1)
    return 1.0


def resample_part(step: int, every: int | None, parts: int, total: int) -> int | None:
    """Which part of a resample spread over ``parts`` steps runs after ``step`` (None: none). A
    resample starts at each multiple of ``every`` whose last part still comes before ``total``."""
    if not every or step < every:
        return None
    part = step % every
    return part if part < parts and step - part + parts - 1 < total else None
