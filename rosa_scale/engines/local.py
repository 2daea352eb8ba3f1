"""Full tensors on every process (one process, or DDP replicas): split in place, share by broadcast.

Under DDP each matrix is factorized by its owner rank only and then broadcast, so the
factorization work is spread over the ranks and every replica holds bit-identical values.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..factorize import window_generator
from ..layer import RosaLinear
from .plan import plan_owners


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class LocalEngine:
    name = "local"

    @torch.no_grad()
    def resplit(self, layers: dict[str, RosaLinear], index: int, seed: int, method: str, sampling: str) -> None:
        world, rank = _world()
        owners = plan_owners({n: (l.out_features, l.in_features) for n, l in layers.items()}, world)
        for name, layer in layers.items():
            if owners[name] == rank:
                layer.resplit_(window_generator(seed, index, name), method, sampling)
        if world > 1:
            handles = [
                dist.broadcast(t, src=owners[name], async_op=True)
                for name, layer in layers.items()
                for t in (layer.weight_param.data, layer.up.data, layer.down.data)
            ]
            for handle in handles:
                handle.wait()

    def reset_optimizer_state(self, optimizer, params) -> None:
        """Forget the moments (and step count) of ``params``: torch optimizers re-create them lazily."""
        inner = getattr(optimizer, "optimizer", optimizer)
        for p in params:
            inner.state.pop(p, None)
