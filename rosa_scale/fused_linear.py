"""``base(x) + up(down(x))`` as one autograd node whose adapter terms ride inside the base's GEMMs.

Run as separate operations, the adapter writes an output-sized ``up(down(x))`` and the sum reads it
back (forward), and its input gradient ``grad_h @ down`` is written and then added to the base's
(backward): memory-bound passes over activation-sized tensors around matmuls that are otherwise
compute-bound. Here the thin product is written once and the base GEMM accumulates into it in place
(``addmm_``: read inside the GEMM's epilogue), forward and backward; ``down(x)`` is kept for the
backward instead of recomputed. Factors held wider than the activations (fp32 beside a bf16 base) are
cast inside the node and their gradients come out of the GEMMs' fp32 accumulators in their own dtype:
no cast kernel per factor in the backward, and no rounding to bf16 on the way. Same function and
gradients (tests/test_fused_linear.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from . import thin_forward, thin_grads


# ``acc += a @ b`` in place: a GEMM whose epilogue reads the accumulator. An op the compiler cannot see into,
# so it stays in place (traced as ``addmm``, it becomes out-of-place and copies ``acc`` first: a pass as costly
# as the add it replaces); compiled graphs call it on a buffer no one else reads. Defined through the
# dispatcher directly: ~3 us a call against ~15 us for a ``torch.library.custom_op`` (two calls per layer).
_LIBRARY = torch.library.Library("rosa_scale", "DEF")
_LIBRARY.define("accumulate_mm(Tensor(a!) acc, Tensor a, Tensor b) -> ()")


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.addmm_(a, b)


_LIBRARY.impl("accumulate_mm", _accumulate_mm, "CompositeExplicitAutograd")
torch.library.register_fake("rosa_scale::accumulate_mm", lambda acc, a, b: None, lib=_LIBRARY)
accumulate_mm = torch.ops.rosa_scale.accumulate_mm.default


def _mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype``: written straight from the fp32 accumulator where the backend can (CUDA)."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _forward_products(x, weight, bias, down, up, transposed: bool, kernels: bool) -> tuple[torch.Tensor, ...]:
    """``h = x down^T`` and ``out = h up^T + bias`` (thin_forward's kernel where ``kernels`` and it applies),
    then ``out += x W^T`` inside the base GEMM."""
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ down.t()
    (out,) = thin_forward.adapter_terms(h, [up], [bias], kernels)
    accumulate_mm(out, x2, weight if transposed else weight.t())
    return h, out


def cast_factors(dtype: torch.dtype, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The factors in ``dtype``, all in one cast (one kernel where the graph is compiled, not one each)."""
    if all(f.dtype == dtype for f in factors):
        return factors
    flat = torch.cat([f.reshape(-1) for f in factors]).to(dtype)
    return tuple(part.view(f.shape) for part, f in zip(flat.split([f.numel() for f in factors]), factors))


def up_side_grads(g, up, h, need_grad_h: bool, need_up: bool, kernels: bool, factor_dtype: torch.dtype):
    """``grad_h = g up`` and ``grad_up = g^T h`` (None where not needed): one read of ``g`` where thin_grads'
    kernel applies (``kernels``; ``grad_h`` then comes as its fp32 sums), two GEMMs otherwise."""
    if kernels and need_up and need_grad_h and thin_grads.usable(g, up, h):
        grad_h, (grad_up,) = thin_grads.grad_h_and_up([g], [up], h, factor_dtype)
        return grad_h, grad_up
    return g @ up if need_grad_h else None, _mm_as(g.t(), h, factor_dtype) if need_up else None


def down_side_grads(x2, down, grad_h, need_x: bool, need_down: bool, kernels: bool, factor_dtype: torch.dtype):
    """``grad_down = grad_h^T x`` and the adapter's input gradient ``grad_h down`` (a fresh tensor the base
    GEMM may accumulate into), None where not needed: one read of ``x`` where the kernel applies (it rounds an
    fp32 ``grad_h`` to ``x``'s dtype as it loads it; the GEMMs get it rounded first)."""
    if kernels and need_x and need_down and thin_grads.usable(x2, down, grad_h):
        return thin_grads.grad_down_and_x(x2, down, grad_h, factor_dtype)
    grad_h = grad_h.to(x2.dtype)
    return _mm_as(grad_h.t(), x2, factor_dtype) if need_down else None, grad_h @ down if need_x else None


class FusedRosaLinear(torch.autograd.Function):
    """``x @ W^T + bias + (x @ down^T) @ up^T`` with W stored (out, in), or (in, out) when ``transposed``,
    computed in ``dtype``: the inputs' own, or autocast's (each input cast as autocast's ``linear`` casts it).

    Gradients come back in each input's dtype; the factors' (fp32 beside a bf16 compute) straight from the
    GEMMs' fp32 accumulators. ``kernels``: (forward, backward), whether each may use rosa_scale's Triton
    kernels (thin_forward.py, thin_grads.py) where they apply (False: GEMMs only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, transposed: bool, kernels: tuple, dtype: torch.dtype):
        ctx.factor_dtype, ctx.kernels, ctx.transposed = down.dtype, kernels[1], transposed
        ctx.input_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        x, weight = x.to(dtype), weight.to(dtype)  # no copies unless autocast asks for them
        bias = None if bias is None else bias.to(dtype)
        down, up = cast_factors(dtype, down, up)
        if torch.is_autocast_enabled(x.device.type):  # the operands are in autocast's dtype already
            with torch.autocast(x.device.type, enabled=False):
                h, out = _forward_products(x, weight, bias, down, up, transposed, kernels[0])
        else:
            h, out = _forward_products(x, weight, bias, down, up, transposed, kernels[0])
        ctx.save_for_backward(x, weight, down, up, h)
        ctx.bias_shape = None if bias is None else bias.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable  # the in-place accumulate has no derivative of its own: double backward is refused
    def backward(ctx, grad_out):
        x, weight, down, up, h = ctx.saved_tensors
        need_x, need_w, need_b, need_down, need_up = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_w = grad_b = None
        # each pair below from one read of g, then of x, where thin_grads' kernels apply
        grad_h, grad_up = up_side_grads(g, up, h, need_x or need_down, need_up, ctx.kernels, ctx.factor_dtype)
        grad_down, grad_x = down_side_grads(x2, down, grad_h, need_x, need_down, ctx.kernels, ctx.factor_dtype)
        x_dtype, w_dtype, b_dtype = ctx.input_dtypes
        if need_x:
            accumulate_mm(grad_x, g, weight.t() if ctx.transposed else weight)
            grad_x = grad_x.view(x.shape).to(x_dtype)
        if need_w:
            grad_w = (x2.t() @ g if ctx.transposed else g.t() @ x2).to(w_dtype)
        if need_b:
            grad_b = g.sum(0).reshape(ctx.bias_shape).to(b_dtype)
        return grad_x, grad_w, grad_b, grad_down, grad_up, None, None, None


def fused_dtype(base: nn.Module, x: torch.Tensor, factor_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the fused node computes ``base(x) + up(down(x))`` in here, or None where it cannot.

    Only a plain layer whose forward is its class's own and has no hooks (ZeRO-3 gathers weights in
    hooks; accelerate's offload replaces ``forward``). Under autocast: autocast's dtype, every operand cast
    to it as autocast casts a ``linear``'s (the base's GEMM and the adapter's then run in it, as they would
    apart). Otherwise all in one floating dtype (``factor_dtype``: the dtype the factors are used in)."""
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    weight, bias = base.weight, getattr(base, "bias", None)
    dtypes = {x.dtype, weight.dtype, factor_dtype} | ({bias.dtype} if bias is not None else set())
    if not all(d.is_floating_point for d in dtypes):
        return None
    if torch.is_autocast_enabled(x.device.type):  # float64 is never cast by autocast: left to it, apart
        return None if torch.float64 in dtypes else torch.get_autocast_dtype(x.device.type)
    return x.dtype if len(dtypes) == 1 else None
