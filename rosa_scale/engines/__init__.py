"""Ways parameters can live (full, FSDP2 shards, ZeRO-3 partitions), behind one small interface.

An engine provides ``resplit(layers, index, seed, method, sampling)`` and
``reset_optimizer_state(optimizer, params)``; ``engine_for`` picks it from the model itself.
"""
from __future__ import annotations

import torch.nn as nn

from .local import LocalEngine


def engine_for(model: nn.Module):
    """The engine matching how the model's parameters are stored (never guessed from flags)."""
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            raise NotImplementedError("DeepSpeed ZeRO-3 partitioned parameters are not supported yet")
        if type(p.data).__name__ == "DTensor" or type(p).__name__ == "DTensor":
            raise NotImplementedError("FSDP2 (DTensor) parameters are not supported yet")
    return LocalEngine()
