"""resample: fold the trained factors into the weights and train a new subspace from there."""
from __future__ import annotations

import time

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .engines import engine_for
from .engines.plan import plan_owners
from .guard import check_layers
from .model import rosa_layers, rosa_state


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP or DeepSpeed wrapper."""
    while isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def resample_parts(model: nn.Module, parts: int) -> list[list[str]]:
    """The ROSA layers in ``parts`` groups of about equal factorization cost (largest first onto the
    lightest group): what each step of a resample spread over ``parts`` steps resplits. Deterministic
    from names and shapes, so every process forms the same groups."""
    shapes = {n: (layer.out_features, layer.in_features) for n, layer in rosa_layers(model).items()}
    if not 1 <= parts <= max(1, len(shapes)):
        raise ValueError(f"a resample can be spread over 1 to {len(shapes)} steps (one per matrix), not {parts}")
    groups = plan_owners(shapes, parts)
    return [[n for n in shapes if groups[n] == g] for g in range(parts)]


def resample(model: nn.Module, optimizer=None, *, index: int | None = None, part: tuple[int, int] | None = None) -> float:
    """Merge -> split with the window of resample ``index`` -> write in place; reset adapter state.

    ``index`` defaults to one past the model's latest split. The model's function is unchanged.
    Every process of a distributed run must call this together. Returns the seconds it took.
    Non-finite weights or factors are refused (``guard.DivergedError`` naming the module) before
    anything is folded, so they never reach the frozen weights.
    ``part=(j, n)`` resplits only group ``j`` of ``resample_parts(model, n)`` (and resets only its
    factors' optimizer state): a resample spread over ``n`` calls, one per step, j = 0 .. n-1. The
    model's split index moves to ``index`` with the last group, so every group gets the same index.
    """
    model = unwrap(model)
    state = rosa_state(model)
    index = state.split_index + 1 if index is None else index
    cfg = state.config
    engine = engine_for(model)
    start = time.perf_counter()
    layers = rosa_layers(model)
    if part is not None:
        j, n = part
        if not 0 <= j < n:
            raise ValueError(f"part {j} of a resample in {n} parts does not exist")
        layers = {name: layers[name] for name in resample_parts(model, n)[j]}
    check_layers(layers, f"resample {index}")
    engine.resplit(model, layers, index, cfg)
    if part is None or part[0] == part[1] - 1:
        state.split_index = index
    if optimizer is not None:
        engine.reset_optimizer_state(optimizer, [p for layer in layers.values() for p in (layer.up, layer.down)])
    return time.perf_counter() - start
