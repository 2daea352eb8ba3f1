"""Full tensors on every process (one process, or DDP replicas): split in place, share by broadcast.

Under DDP each matrix is factorized by its owner rank only and then broadcast, so the
factorization work is spread over the ranks and every replica holds bit-identical values.
A quantized layer's base is never written: each replica folds the finished window into its
stack itself (element-wise, so bit-identically) and the owner broadcasts only the new factors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..factorize import window_generator
from .plan import plan_owners
from .state import reset_optimizer_state


def world() -> tuple[int, int]:
    """(world size, rank), or (1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class LocalEngine:
    name = "local"
    reset_optimizer_state = staticmethod(reset_optimizer_state)

    @staticmethod
    def sync_gradients(model) -> None:
        """Nothing left to average: one process, or DDP's own all-reduce in backward."""

    @torch.no_grad()
    def resplit(self, model, layers, index: int, config) -> None:
        size, rank = world()
        owners = plan_owners({n: (l.out_features, l.in_features) for n, l in layers.items()}, size)
        for name, layer in layers.items():
            if owners[name] == rank:
                layer.resplit_(window_generator(config.seed, index, name), config)
            elif size > 1:
                layer.follow_resplit_()
        if size > 1:
            handles = [
                dist.broadcast(t, src=owners[name], async_op=True)
                for name, layer in layers.items()
                for t in layer.resplit_tensors()
            ]
            for handle in handles:
                handle.wait()
