"""The optimizer rosa-train builds for the ROSA factors: torch AdamW or bitsandbytes' 8-bit AdamW.

Every kind keeps its per-factor state in ``optimizer.state[param]`` (torch: ``step``, ``exp_avg``,
``exp_avg_sq``; bitsandbytes: ``step``, ``state1``/``state2`` in uint8, ``absmax1/2``, ``qmap1/2``),
so a resample's reset (``engines.state.reset_optimizer_state``) forgets all of it, scales included,
and the optimizer starts that factor afresh at its next step.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from .config import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def build_optimizer(name: str, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float):
    """``name`` over ``params`` (the factors alone, one group). torch's AdamW is fused on CUDA (one
    kernel for all factors); bitsandbytes keeps 8-bit state for every factor with >= 4096 elements
    (its default), 32-bit for smaller ones."""
    if name == "adamw":
        fused = bool(params) and all(p.is_cuda for p in params) and not any(isinstance(p, DTensor) for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"config key 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"config key 'optimizer' {name!r} needs bitsandbytes: pip install 'rosa-scale[bnb]'") from None
    if any(isinstance(p, DTensor) for p in params):
        raise ConfigError(f"config key 'optimizer' {name!r} cannot hold FSDP2's sharded factors (bitsandbytes "
                          "quantizes whole tensors): use optimizer 'adamw' under FSDP2")
    cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)
