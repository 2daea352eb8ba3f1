"""Compile each decoder layer with torch.compile, as the fast path of a training step.

ROSA adds two thin matmuls per adapted layer (r=16 of 4096: under 1% of the flops); run eagerly,
their launches and the elementwise work around them cost ~15% of a step on an H200. Compiling
each decoder layer (the same layers FSDP2 shards, compiled before sharding, as FSDP2 expects)
fuses that work away and lifts the frozen base as much. The model computes the same function:
``compile_decoder_layers`` changes how, not what.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: instances of its ``_no_split_modules`` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile's default backend cannot compile for ``device`` here (None: it can)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (pip install triton)"
    if device.type == "cpu":
        import shutil

        return None if shutil.which("g++") or shutil.which("clang++") else "no C++ compiler on PATH"
    return f"torch.compile is not supported on {device.type} here"


def compile_decoder_layers(model: nn.Module, device: torch.device) -> int:
    """``layer.compile()`` on every decoder layer (in place; parameters and state dict keys unchanged);
    returns how many. One ``ConfigError`` line when compilation is unavailable or the model names no
    decoder-layer class."""
    why = compile_unavailable(device)
    if why:
        raise ConfigError(f"config key 'compile' is true but {why}: set compile: false")
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"config key 'compile': {type(model).__name__} names no decoder-layer class "
                          "(_no_split_modules) to compile")
    for layer in layers:
        layer.compile()
    return len(layers)
