"""Adapted layers handed one input (q, k, v; gate, up) computed as one node, one pass over that input.

Each adapted layer reads its input ``x`` (tokens x in) in the forward for ``h = x down^T`` and again in the
backward for ``grad_down = grad_h^T x`` while writing an x-sized ``grad_h down``; and the model then sums
each layer's x-sized input gradient. Attention's q, k and v (and the MLP's gate and up) are called on the
very same tensor, so here the first of them called computes every member's output: the ``down`` factors
stacked make one thin GEMM of the summed rank, the backward one thin_grads pass over ``x`` whose result
the members' base GEMMs accumulate into (in their epilogues), and one input gradient leaves the group
instead of one per layer. Same function (tests/test_shared_input.py).

The group holds the outputs only for the tensor the first member was called with, and only until every
member has taken its own; a member called again makes new ones. A member called on another tensor before
taking its output shows that the model feeds them different inputs (cross-attention's q against k and v):
the group then steps aside for good, each member computing alone. Members are
grouped by name in ``apply_rosa`` (``RosaConfig.shared_inputs``); a group whose members would not all take
the fused node in one dtype (hooks, autocast with float64, mixed factor dtypes) steps aside, each member
then computing alone (rosa_scale/fused_linear.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from . import thin_forward, thin_grads
from .fused_linear import accumulate_mm, cast_factors, down_side_grads, fused_dtype, up_side_grads

PER_MEMBER = 4  # weight, bias (or None), down, up


def _forward_products(x, down, weights, biases, ups, transposed, kernels: bool) -> tuple[torch.Tensor, tuple]:
    """``h`` (every member's ``h_i`` side by side, one GEMM) and each member's output: ``h_i up_i^T + b_i``
    (``h_i`` read in place, a column slice; the group's in one launch of thin_forward's kernel where
    ``kernels`` and it applies), then ``+= x W_i^T`` inside the base GEMM."""
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ down.t()
    outs = []
    for w, out, t in zip(weights, thin_forward.adapter_terms(h, list(ups), list(biases), kernels), transposed):
        accumulate_mm(out, x2, w if t else w.t())
        outs.append(out.view(*x.shape[:-1], out.shape[-1]))
    return h, tuple(outs)


def _up_side_grads(gs, ups, h, ranks, need_up, kernels: bool, factor_dtype) -> tuple[torch.Tensor, list]:
    """Every member's ``grad_h`` side by side and its ``grad_up`` (None where not needed): one thin_grads
    call for the group where its kernel applies to each member, each member's own products otherwise."""
    hs = h.split(ranks, dim=1)
    if kernels and all(need_up) and all(thin_grads.usable(g, up, h_i) for g, up, h_i in zip(gs, ups, hs)):
        grad_h, grad_ups = thin_grads.grad_h_and_up(gs, ups, h, factor_dtype)
        return grad_h, list(grad_ups)
    pairs = [up_side_grads(g, up, h_i, True, want, kernels, factor_dtype)
             for g, up, h_i, want in zip(gs, ups, hs, need_up)]
    return torch.cat([grad_h for grad_h, _ in pairs], dim=1), [grad_up for _, grad_up in pairs]


class SharedInputLinears(torch.autograd.Function):
    """``x W_i^T + b_i + (x down_i^T) up_i^T`` for each member i, computed in ``dtype``; ``transposed[i]``:
    W_i stored (in, out); ``kernels``: (forward, backward) may use rosa_scale's Triton kernels.
    ``tensors``: weight, bias, down, up of each member in turn."""

    @staticmethod
    def forward(ctx, x, dtype: torch.dtype, kernels: tuple, transposed: tuple, *tensors):
        weights, biases = tensors[0::PER_MEMBER], tensors[1::PER_MEMBER]
        downs, ups = tensors[2::PER_MEMBER], tensors[3::PER_MEMBER]
        ctx.ranks, ctx.kernels, ctx.transposed = [d.shape[0] for d in downs], kernels[1], transposed
        ctx.factor_dtype = downs[0].dtype
        ctx.input_dtypes = (x.dtype, [w.dtype for w in weights], [None if b is None else b.dtype for b in biases])
        ctx.bias_shapes = [None if b is None else b.shape for b in biases]
        x = x.to(dtype)  # no copy unless autocast asks for one
        weights = [w.to(dtype) for w in weights]
        biases = [None if b is None else b.to(dtype) for b in biases]
        factors = cast_factors(dtype, *downs, *ups)  # the downs first: consecutive rows of one stacked factor
        down = torch.cat(factors[:len(downs)]) if len(downs) > 1 else factors[0]
        ups = factors[len(downs):]
        if torch.is_autocast_enabled(x.device.type):  # the operands are in their compute dtype already
            with torch.autocast(x.device.type, enabled=False):
                h, outs = _forward_products(x, down, weights, biases, ups, transposed, kernels[0])
        else:
            h, outs = _forward_products(x, down, weights, biases, ups, transposed, kernels[0])
        ctx.save_for_backward(x, down, h, *weights, *ups)
        return outs

    @staticmethod
    @once_differentiable  # the in-place accumulates have no derivative of their own
    def backward(ctx, *grad_outs):
        n = len(ctx.ranks)
        x, down, h, *rest = ctx.saved_tensors
        weights, ups = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        need_x = need[0]
        need_w, need_b = need[4::PER_MEMBER], need[5::PER_MEMBER]
        need_down, need_up = any(need[6::PER_MEMBER]), need[7::PER_MEMBER]
        x2 = x.reshape(-1, x.shape[-1])
        gs = [g.reshape(-1, g.shape[-1]) for g in grad_outs]
        grad_h, grad_ups = _up_side_grads(gs, ups, h, ctx.ranks, need_up, ctx.kernels, ctx.factor_dtype)
        grad_down, grad_x = down_side_grads(x2, down, grad_h, need_x, need_down, ctx.kernels, ctx.factor_dtype)
        x_dtype, w_dtypes, b_dtypes = ctx.input_dtypes
        if need_x:  # every member's base term added inside its GEMM: one input gradient leaves the group
            for g, w, t in zip(gs, weights, ctx.transposed):
                accumulate_mm(grad_x, g, w.t() if t else w)
            grad_x = grad_x.view(x.shape).to(x_dtype)
        grad_downs = grad_down.split(ctx.ranks) if grad_down is not None else (None,) * n
        grads = []
        for i, (g, t) in enumerate(zip(gs, ctx.transposed)):
            grad_w = (x2.t() @ g if t else g.t() @ x2).to(w_dtypes[i]) if need_w[i] else None
            grad_b = g.sum(0).reshape(ctx.bias_shapes[i]).to(b_dtypes[i]) if need_b[i] else None
            grads += [grad_w, grad_b, grad_downs[i], grad_ups[i]]
        return (grad_x, None, None, None, *grads)


class SharedInputGroup:
    """Sibling adapted layers that their model calls on one input tensor (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        self.disabled = False  # set once the members turn out to be called on different tensors
        self._x = self._outs = None
        self._left = self._taken = 0  # outputs not yet taken; bit i: member i has taken its own

    def output(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """``layer(x)`` from the group's one node, or None where the group cannot make it."""
        if self.disabled:
            return None
        taken = self._taken >> layer.shared_index & 1
        if self._left and not taken:
            if self._x is not x:
                # a member called on another tensor before taking its output (cross-attention's k and v, say):
                # these layers do not share their input in this model, so each computes alone from now on
                self.disabled, self._x, self._outs, self._left = True, None, None, 0
                return None
        elif self._left and self._x is x:  # called again before its siblings took theirs: alone, theirs kept
            return None
        else:
            if not self._all_fused(x, dtype):
                return None
            tensors = [t for m in self.members for t in (m.base.weight, getattr(m.base, "bias", None), m.down, m.up)]
            kernels = (all(m.forward_kernels for m in self.members), all(m.backward_kernels for m in self.members))
            self._outs = SharedInputLinears.apply(x, dtype, kernels,
                                                  tuple(m.transposed for m in self.members), *tensors)
            self._x, self._left, self._taken = x, len(self.members), 0
        out = self._outs[layer.shared_index]
        self._left -= 1
        self._taken |= 1 << layer.shared_index
        if self._left == 0:  # every member has its own: hold nothing past the layer's forward, and start the
            # next forward from the very state this one started from (a compiled layer guards on it: any
            # other state would compile the layer again, and each decoder layer shares one cache of 8)
            self._x = self._outs = None
            self._taken = 0
        return out

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
