"""Ways parameters can live (full, FSDP2 shards, ZeRO-3 partitions), behind one small interface.

An engine provides ``resplit(model, layers, index, config)`` (merge and split every ROSA layer
on the windows of resample ``index``, in place), ``reset_optimizer_state(optimizer, params)`` and
``sync_gradients(model)`` (the gradient averaging its wrapper leaves to the training loop, called by
every process after the last backward of an optimizer step);
``engine_for`` picks it from how the model's parameters are stored, never from flags.
"""
from __future__ import annotations

import torch.nn as nn

from .local import LocalEngine


def engine_for(model: nn.Module):
    """The engine matching how the model's parameters are stored."""
    from .fsdp2 import Fsdp2Engine, is_sharded
    from .zero3 import Zero3Engine, is_partitioned

    if is_partitioned(model):
        return Zero3Engine()
    if is_sharded(model):
        return Fsdp2Engine()
    return LocalEngine()
