"""Adapted layers handed one input (q, k, v; gate, up) make their thin products in one pass over it.

Each adapted layer reads its input ``x`` (tokens x in) in the forward for ``h = x down^T`` and twice in the
backward: for ``grad_down = grad_h^T x``, and while writing an x-sized ``grad_h down`` that the base's GEMM
reads back. Attention's q, k and v (and the MLP's gate and up) are called on the very same tensor, so
their ``down`` factors stacked make one GEMM of the summed rank, and one x-sized backward pass (one
thin_grads kernel) instead of one per layer. Each layer's fused node (rosa_scale/fused_linear.py) then
takes its ``h`` ready-made.

The group holds the products only for the tensor the first member was called with, and only until every
member has taken its own: a member called on another tensor, or called again, makes new ones. Members are
grouped by name in ``apply_rosa`` (``RosaConfig.shared_inputs``); a group whose members would not all take
the fused node in one dtype (hooks, autocast with float64, mixed factor dtypes) steps aside.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from . import thin_grads
from .fused_linear import _mm_as, cast_factors, fused_dtype


class SharedDown(torch.autograd.Function):
    """``x @ down_i^T`` for every factor ``down_i`` from one GEMM over ``x``, each product contiguous;
    the backward makes ``sum_i grad_h_i @ down_i`` and every ``grad_down_i`` from one pass over ``x``."""

    @staticmethod
    def forward(ctx, x, dtype: torch.dtype, kernels: bool, *downs):
        ctx.ranks, ctx.kernels = [d.shape[0] for d in downs], kernels
        ctx.factor_dtype, ctx.x_dtype = downs[0].dtype, x.dtype
        x = x.to(dtype)  # no copy unless autocast asks for one
        down = torch.cat(cast_factors(dtype, *downs))
        x2 = x.reshape(-1, x.shape[-1])
        if torch.is_autocast_enabled(x.device.type):  # the operands are in autocast's dtype already
            with torch.autocast(x.device.type, enabled=False):
                h = x2 @ down.t()
        else:
            h = x2 @ down.t()
        ctx.save_for_backward(x, down)
        return tuple(part.contiguous() for part in h.split(ctx.ranks, dim=1))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_hs):
        x, down = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_down = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
        grad_h = torch.cat(grad_hs, dim=1)
        grad_x = grad_down = None
        if ctx.kernels and need_x and need_down and thin_grads.usable(x2, down, grad_h):
            grad_down, grad_x = thin_grads.grad_down_and_x(x2, down, grad_h, ctx.factor_dtype)
        else:
            grad_x = grad_h @ down if need_x else None
            if need_down:
                grad_down = _mm_as(grad_h.t(), x2, ctx.factor_dtype)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape).to(ctx.x_dtype)
        grad_downs = grad_down.split(ctx.ranks) if grad_down is not None else (None,) * len(ctx.ranks)
        return (grad_x, None, None, *grad_downs)


class SharedInputGroup:
    """Sibling adapted layers that their model calls on one input tensor (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        self._x = self._hs = None
        self._left = 0

    def product(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """``x @ layer.down^T`` in ``dtype`` from the group's one GEMM, or None where the group cannot make it."""
        if self._x is not x or self._left == 0:
            if not self._all_fused(x, dtype):
                return None
            kernels = all(m.backward_kernels for m in self.members)
            self._hs = SharedDown.apply(x, dtype, kernels, *(m.down for m in self.members))
            self._x, self._left = x, len(self.members)
        h = self._hs[layer.shared_index]
        self._left -= 1
        if self._left == 0:  # every member has its own: hold nothing past the layer's forward
            self._x = self._hs = None
        return h

    def _all_fused(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Every member would compute its fused node in ``dtype``, with factors of one dtype, unhooked
        (a hook of its own, e.g. a per-layer FSDP unshard, may not have run for the later members yet)."""
        factor_dtypes = {m.down.dtype for m in self.members}
        return len(factor_dtypes) == 1 and all(
            m.fused and not m._forward_pre_hooks and not m._forward_hooks
            and fused_dtype(m.base, x, m.compute_dtype or m.up.dtype) == dtype for m in self.members)


def group_shared_inputs(layers: dict[str, nn.Module], groups: Sequence[Sequence[str]]) -> int:
    """Give sibling layers named in one of ``groups`` (e.g. ``["q_proj", "k_proj", "v_proj"]``) a
    SharedInputGroup when at least two of them are adapted with the same input width. Returns how many."""
    made = 0
    for group in groups:
        by_parent: dict[str, list[nn.Module]] = {}
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            if child in group and layer.fused:
                by_parent.setdefault(parent, []).append(layer)
        for members in by_parent.values():
            if len(members) >= 2 and len({m.in_features for m in members}) == 1:
                shared = SharedInputGroup(members)
                for index, m in enumerate(members):
                    m.shared_input, m.shared_index = shared, index
                made += 1
    return made
