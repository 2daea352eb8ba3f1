"""resample: fold the trained factors into the weights and train a new subspace from there."""
from __future__ import annotations

import time

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .engines import engine_for
from .guard import check_layers
from .model import adapter_parameters, rosa_layers, rosa_state


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP or DeepSpeed wrapper."""
    while isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def resample(model: nn.Module, optimizer=None, *, index: int | None = None) -> float:
    """Merge -> split with the window of resample ``index`` -> write in place; reset adapter state.

    ``index`` defaults to one past the model's latest split. The model's function is unchanged.
    Every process of a distributed run must call this together. Returns the seconds it took.
    Non-finite weights or factors are refused (``guard.DivergedError`` naming the module) before
    anything is folded, so they never reach the frozen weights.
    """
    model = unwrap(model)
    state = rosa_state(model)
    index = state.split_index + 1 if index is None else index
    cfg = state.config
    engine = engine_for(model)
    start = time.perf_counter()
    layers = rosa_layers(model)
    check_layers(layers, f"resample {index}")
    engine.resplit(model, layers, index, cfg)
    state.split_index = index
    if optimizer is not None:
        engine.reset_optimizer_state(optimizer, adapter_parameters(model))
    return time.perf_counter() - start
