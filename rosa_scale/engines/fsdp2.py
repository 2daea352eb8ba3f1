"""FSDP2 (DTensor shards): each matrix is factorized by one owner rank, results written into shards.

A resample goes in rounds. In each round every rank owns at most one matrix: the full
``w_fixed``, ``up`` and ``down`` of the round's matrices are gathered (a rank keeps only the one
it owns), the owners merge and split concurrently, and each owner scatters its new values
into the existing local shards. Peak extra memory per rank is one matrix's full tensors
plus one in flight, whatever the model size; parameter objects are never replaced.

A quantized base (bitsandbytes' packed 4-bit codes or int8 rows) is not sharded: FSDP2 cannot
split packed codes into DTensor shards, and at 4 bits the whole base costs each rank what a bf16
base sharded over 4 ranks would. Only its factors are sharded; the frozen copies and the stack are
replicated buffers that every rank updates alike.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..compiled_layers import decoder_layers
from ..factorize import window_generator
from ..layer import RosaLinear, resplit_values
from ..quant import QuantRosaLinear, quantized_base_params
from .local import world
from .plan import owner_queues
from .state import reset_optimizer_state


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None = torch.bfloat16,
                reduce_dtype: torch.dtype | None = torch.float32, mesh=None,
                reshard_after_forward: bool = True, replicate_factors: bool = False) -> nn.Module:
    """``fully_shard`` every decoder layer (classes in ``model._no_split_modules``) and the root.

    Call after ``apply_rosa(model, cfg, split=False)`` and before building the optimizer, then
    make the first split with ``resample(model, index=0)``. ``replicate_factors``: the ROSA factors stay
    whole on every rank (FSDP2 ignores them; cast to ``param_dtype`` inside each layer's forward), and
    ``sync_replicated_grads`` averages their gradients in one collective: FSDP2's per-tensor work and
    DTensor dispatch for 14 small tensors per decoder layer are the host time of a step otherwise.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = decoder_layers(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class in _no_split_modules to shard by")
    whole = set(quantized_base_params(model))  # packed 4-bit codes cannot be split into DTensor shards
    if replicate_factors:
        for layer in model.modules():
            if isinstance(layer, RosaLinear):
                whole |= {layer.up, layer.down}
                layer.compute_dtype = param_dtype
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=whole or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                ignored_params=whole or None)
    return model


def replicated_factors(model: nn.Module) -> list[nn.Parameter]:
    """The ROSA factors FSDP2 left whole on every rank (``shard_model(replicate_factors=True)``)."""
    return [p for layer in model.modules() if isinstance(layer, RosaLinear) for p in (layer.up, layer.down)
            if not isinstance(p, DTensor)]


@torch.no_grad()
def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the replicated factors over the ranks: one all-reduce per dtype (a
    collective; every rank calls it at the same micro-batch, the last of each optimizer step)."""
    size = dist.get_world_size()
    if size == 1:  # one process: its gradients are already the average
        return
    grads = [p.grad for p in replicated_factors(model) if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= size
        # one multi-tensor copy back: a copy per tensor is ~450 launches per step at 8B
        parts = flat.split([g.numel() for g in group])
        torch._foreach_copy_(group, [part.view_as(g) for g, part in zip(group, parts)])


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def _write(p: nn.Parameter, value: torch.Tensor | None, src: int) -> None:
    """Copy ``value`` (held by rank ``src`` only) into every rank's part of ``p``."""
    if isinstance(p, DTensor):
        local = p.to_local()
        if value is None:
            value = torch.empty(p.shape, dtype=p.dtype, device=local.device)
        local.copy_(distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=src).to_local())
    else:  # a parameter FSDP left whole (a layer outside any sharded module): replicate it
        if value is not None:
            p.data.copy_(value)
        dist.broadcast(p.data, src=src)


class Fsdp2Engine:
    name = "fsdp2"
    reset_optimizer_state = staticmethod(reset_optimizer_state)
    sync_gradients = staticmethod(sync_replicated_grads)  # FSDP2 reduces the sharded ones in backward

    @torch.no_grad()
    def resplit(self, model, layers, index: int, config) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():  # a no_grad forward leaves the root unsharded: writes would be lost
            if isinstance(module, FSDPModule):
                module.reshard()
        size, rank = world()
        queues = owner_queues({n: (l.out_features, l.in_features) for n, l in layers.items()}, size)
        for step in range(max(len(q) for q in queues)):
            round_ = [(r, q[step]) for r, q in enumerate(queues) if step < len(q)]
            plain = [(owner, name) for owner, name in round_ if not isinstance(layers[name], QuantRosaLinear)]
            self._plain_round(plain, layers, index, config, rank)
            quantized = [(owner, name) for owner, name in round_ if isinstance(layers[name], QuantRosaLinear)]
            self._quantized_round(quantized, layers, index, config, rank)

    @staticmethod
    def _plain_round(round_, layers, index: int, config, rank: int) -> None:
        """The round's plain layers: gather, owners merge and split concurrently, write back."""
        mine = None
        for owner, name in round_:
            layer = layers[name]
            full = [_full(t) for t in (layer.weight_param, layer.up, layer.down)]  # collective
            if owner == rank:
                mine = (name, full)
            del full
        new = None
        if mine is not None:
            name, (w, up, down) = mine
            layer = layers[name]
            new = resplit_values(w, up, down, transposed=layer.transposed, rank=layer.rank,
                                 generator=window_generator(config.seed, index, name), config=config)
            del mine, w, up, down
        for owner, name in round_:
            layer = layers[name]
            values = new if owner == rank else (None, None, None)
            for param, value in zip((layer.weight_param, layer.up, layer.down), values):
                _write(param, value, owner)

    @staticmethod
    def _quantized_round(round_, layers, index: int, config, rank: int) -> None:
        """The round's layers over a quantized base, whole on every rank (``shard_model`` leaves the base
        unsharded): all ranks gather the factors and fold the window into their stacks alike, the owners
        split ``deq(Q0) + S`` concurrently, and each owner's new factors go to every rank's shards and
        frozen copies."""
        new = (None, None)
        for owner, name in round_:
            layer = layers[name]
            up, down = _full(layer.up), _full(layer.down)  # collective
            layer.fold_window_(up, down)
            del up, down
            if owner == rank:
                new = layer.split_frozen(window_generator(config.seed, index, name), config)
        for owner, name in round_:
            layer = layers[name]
            values = new if owner == rank else (None, None)
            for param, value in zip((layer.up, layer.down), values):
                _write(param, value, owner)
            for frozen, value in zip((layer.up0, layer.down0), values):
                if value is not None:
                    frozen.copy_(value)
                dist.broadcast(frozen, src=owner)
            layer.windows += 1
