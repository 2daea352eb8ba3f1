"""Optimizer-state reset shared by the engines."""
from __future__ import annotations


def reset_optimizer_state(optimizer, params) -> None:
    """Forget the moments and step count of ``params``; torch optimizers re-create them lazily.

    Works on accelerate's wrapper and on sharded (DTensor) state alike.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    for p in params:
        inner.state.pop(p, None)
