"""The adapter's backward products in pairs, each pair from one read of an activation-sized tensor (CUDA, Triton).

``grad_h = g @ up`` and ``grad_up = g^T @ h`` both stream the ``tokens x out`` output gradient ``g``;
``grad_down = grad_h^T @ x`` reads the ``tokens x in`` input while ``grad_h @ down`` writes one of that size.
As cuBLAS GEMMs (the long reductions split and reduced again) each pair takes 1.2-1.9x the time of one
kernel here at Llama-3-8B's shapes on an H200 (bench/results/thin-grads-2026-12-01-*.json): each program
multiplies one tile both ways and adds its part of the rank-r result into fp32 sums. Those sums are made
with atomic adds, so their rounding order varies between runs: under
``torch.use_deterministic_algorithms(True)`` the GEMMs run instead, as they do on CPU, without Triton, and
for ranks below 16 (the tensor cores' smallest side). Other ranks are padded to a power of two inside the
kernels (masked loads), so a group of layers sharing one input (rosa_scale/shared_input.py) runs them at
the sum of its ranks. ``grad_h_and_up`` takes such a group's members in one call: one fill for all their
sums, each member's ``h_i`` read in place from the group's ``h`` and their ``grad_h`` written side by side,
left as fp32 sums that ``grad_down_and_x`` rounds as it loads them: no copy, cast or concatenation between;
members of one rank share a launch (q, k and v: 22.9 against 28.8 us a launch each at 8B's shapes,
bench/results/fwd-micro-2026-12-02b-1gpu.json).
"""
from __future__ import annotations

import torch

from .thin_forward import MEMBERS_PER_LAUNCH, runs, slots

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the GEMMs do the work
    triton = None

_LIBRARY = torch.library.Library("rosa_scale", "FRAGMENT")
_LIBRARY.define("grad_h_and_up(Tensor[] gs, Tensor[] ups, Tensor h, ScalarType up_dtype) -> (Tensor, Tensor[])")
_LIBRARY.define("grad_down_and_x(Tensor x, Tensor down, Tensor grad_h, ScalarType down_dtype) -> (Tensor, Tensor)")


def usable(wide: torch.Tensor, factor: torch.Tensor, thin: torch.Tensor) -> bool:
    """Whether a kernel here computes this pair: CUDA half-precision operands in one dtype (``thin`` may
    also be fp32), a rank from 16 to 128, rows of unit stride (``factor`` contiguous), deterministic
    algorithms off, and offsets that fit the kernels' 32-bit index arithmetic. ``factor`` is ``up``
    (out x r) or ``down`` (r x in), ``thin`` the tokens x r operand."""
    rank = thin.shape[-1]
    return (triton is not None and wide.is_cuda and wide.dim() == 2 and wide.stride(1) == 1
            and wide.numel() < 2 ** 31 and wide.stride(0) * wide.shape[0] < 2 ** 31
            and wide.dtype in (torch.bfloat16, torch.float16) and factor.dtype == wide.dtype
            and thin.dtype in (wide.dtype, torch.float32) and thin.dim() == 2 and thin.stride(1) == 1
            and thin.stride(0) * thin.shape[0] < 2 ** 31
            and 16 <= rank <= 128 and factor.is_contiguous()
            and not torch.are_deterministic_algorithms_enabled())


if triton is not None:
    @triton.jit
    def _grad_h_and_up_kernel(g0, g1, g2, up0, up1, up2, grad_up0, grad_up1, grad_up2, width0, width1, width2,
                              g_row_stride0, g_row_stride1, g_row_stride2, blocks0, blocks01, h, grad_h, tokens,
                              h_row_stride, grad_h_row_stride, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr):
        """Program (i, j): rows block i of a member's ``g`` against STEPS of its column blocks, j counting the
        members' column spans side by side (up to three members, each ``h_i``/``grad_h_i`` RANK columns on)."""
        program = tl.program_id(1)
        if program < blocks0:
            g, up, grad_up, width, g_row_stride, column, block = g0, up0, grad_up0, width0, g_row_stride0, 0, program
        elif program < blocks01:
            g, up, grad_up, width, g_row_stride, column, block = (g1, up1, grad_up1, width1, g_row_stride1, RANK,
                                                                  program - blocks0)
        else:
            g, up, grad_up, width, g_row_stride, column, block = (g2, up2, grad_up2, width2, g_row_stride2, 2 * RANK,
                                                                  program - blocks01)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ranks = tl.arange(0, RANK_PAD)
        row_ok, rank_ok = rows < tokens, ranks < RANK
        h_rows = tl.load(h + rows[:, None] * h_row_stride + column + ranks[None, :],
                         mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(g.dtype.element_ty)
        grad_h_rows = tl.zeros([BLOCK_T, RANK_PAD], tl.float32)
        for step in range(STEPS):
            cols = (block * STEPS + step) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < width
            tile = tl.load(g + rows[:, None] * g_row_stride + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            up_cols = tl.load(up + cols[:, None] * RANK + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :],
                              other=0.0)
            grad_h_rows += tl.dot(tile, up_cols)
            tl.atomic_add(grad_up + cols[:, None] * RANK + ranks[None, :], tl.dot(tl.trans(tile), h_rows),
                          mask=col_ok[:, None] & rank_ok[None, :], sem="relaxed")
        tl.atomic_add(grad_h + rows[:, None] * grad_h_row_stride + column + ranks[None, :], grad_h_rows,
                      mask=row_ok[:, None] & rank_ok[None, :], sem="relaxed")

    @triton.jit
    def _grad_down_and_x_kernel(x, down, grad_h, grad_x, grad_down, tokens, width, x_row_stride, grad_h_row_stride,
                                RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_D: tl.constexpr, STEPS: tl.constexpr):
        """Program (i, j): columns block j of ``x`` over STEPS row blocks from i * STEPS."""
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ranks = tl.arange(0, RANK_PAD)
        col_ok, rank_ok = cols < width, ranks < RANK
        down_cols = tl.load(down + ranks[:, None] * width + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :],
                            other=0.0)
        grad_down_cols = tl.zeros([RANK_PAD, BLOCK_D], tl.float32)
        for step in range(STEPS):
            rows = (tl.program_id(0) * STEPS + step) * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = rows < tokens
            grad_h_rows = tl.load(grad_h + rows[:, None] * grad_h_row_stride + ranks[None, :],
                                  mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(x.dtype.element_ty)
            tile = tl.load(x + rows[:, None] * x_row_stride + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            grad_down_cols += tl.dot(tl.trans(grad_h_rows), tile)
            tl.store(grad_x + rows[:, None] * width + cols[None, :],
                     tl.dot(grad_h_rows, down_cols).to(tile.dtype), mask=row_ok[:, None] & col_ok[None, :])
        tl.atomic_add(grad_down + ranks[:, None] * width + cols[None, :], grad_down_cols,
                      mask=rank_ok[:, None] & col_ok[None, :], sem="relaxed")


def _up_side_launch(padded: int, width: int) -> tuple[int, int, int, int, int]:
    """``grad_h_and_up``'s tokens per program, columns per step, steps, warps and pipeline stages for a launch
    over ``width`` columns of ``g`` at a rank padded to ``padded``. Rank 16 as swept at Llama-3-8B's shapes on
    an H200 (bench/results/thin-grads-2026-12-02-sweep-1gpu.json: q, k, v 16.1 against 21.9 us, gate and up
    67.6 against 77.5); other ranks as first measured (thin-grads-2026-12-01-1gpu.json), their fp32 sums of
    a row block kept in registers."""
    if padded == 16:
        return 256, 128, 4 if width <= 4096 else 8 if width < 16384 else 16, 8, 3
    steps = 8 if width >= 4096 else 4
    return 128 if padded <= 64 else 64, 64, steps, 4, 4 if steps == 8 else 3


def _down_side_launch(padded: int, width: int) -> tuple[int, int, int]:
    """``grad_down_and_x``'s columns per program, row blocks of 64 per program and pipeline stages, for ``x``
    ``width`` wide at a rank padded to ``padded``: up to 64 as swept at Llama-3-8B's shapes on an H200
    (thin-grads-2026-12-02-sweep-1gpu.json: 5-8% less time than the first choice at each), wider ranks as first
    measured (thin-grads-2026-12-01-1gpu-more.json), the fp32 sums of a column block kept in registers."""
    if padded <= 64:
        return 64 if padded == 16 else 128, 4 if width > 8192 else 8, 2
    return 64, 8, 3


def _grad_h_and_up(gs: list[torch.Tensor], ups: list[torch.Tensor], h: torch.Tensor, up_dtype: torch.dtype):
    """Each member's pair (``gs[i]``, ``ups[i]``; ``h`` holds every member's ``h_i`` side by side): ``grad_h``
    side by side in one tokens x sum(r) fp32 tensor, and each ``grad_up``. Members next to each other of one
    rank share a launch, three at most."""
    tokens, ranks = h.shape[0], [up.shape[1] for up in ups]
    # one fill for every sum; an fp32 grad_up kept as the factor's gradient holds this storage, tokens x r
    # fp32 numbers more than it needs (twice the bytes of the h saved for the backward): cheaper than more fills
    sums = torch.zeros(tokens * sum(ranks) + sum(up.numel() for up in ups), device=h.device, dtype=torch.float32)
    grad_h = sums[:tokens * sum(ranks)].view(tokens, sum(ranks))
    grad_ups, start = [], tokens * sum(ranks)
    for up in ups:
        grad_ups.append(sums[start:start + up.numel()].view(up.shape))
        start += up.numel()
    for first, end in runs(ranks, MEMBERS_PER_LAUNCH):
        rank, members = ranks[first], range(first, end)
        column = sum(ranks[:first])
        widths = [gs[i].shape[1] for i in members]
        padded = triton.next_power_of_2(rank)
        block_t, block_n, steps, warps, stages = _up_side_launch(padded, sum(widths))
        blocks = [triton.cdiv(w, block_n * steps) for w in widths] + [0, 0]
        g_args = slots([gs[i] for i in members], gs[first])  # unused slots: the first member's tensors
        grid = (triton.cdiv(tokens, block_t), sum(blocks))
        _grad_h_and_up_kernel[grid](*g_args, *slots([ups[i] for i in members], ups[first]),
                                    *slots([grad_ups[i] for i in members], grad_ups[first]),
                                    *(g.shape[1] for g in g_args), *(g.stride(0) for g in g_args),
                                    blocks[0], blocks[0] + blocks[1], h[:, column:], grad_h[:, column:], tokens,
                                    h.stride(0), grad_h.stride(0), rank, padded, block_t, block_n, steps,
                                    num_warps=warps, num_stages=stages)
    # grad_h as summed (fp32): grad_down_and_x rounds it as it loads it
    return grad_h, [grad_up.to(up_dtype) for grad_up in grad_ups]


def _grad_down_and_x(x: torch.Tensor, down: torch.Tensor, grad_h: torch.Tensor, down_dtype: torch.dtype):
    tokens, width = x.shape
    rank = down.shape[0]
    grad_x = torch.empty(tokens, width, device=x.device, dtype=x.dtype)
    grad_down = torch.zeros(rank, width, device=x.device, dtype=torch.float32)
    padded = triton.next_power_of_2(rank)
    block_d, steps, stages = _down_side_launch(padded, width)
    grid = (triton.cdiv(tokens, 64 * steps), triton.cdiv(width, block_d))
    _grad_down_and_x_kernel[grid](x, down, grad_h, grad_x, grad_down, tokens, width, x.stride(0), grad_h.stride(0),
                                  rank, padded, 64, block_d, steps,
                                  num_warps=4, num_stages=stages)
    return grad_down.to(down_dtype), grad_x


_LIBRARY.impl("grad_h_and_up", _grad_h_and_up, "CompositeExplicitAutograd")
_LIBRARY.impl("grad_down_and_x", _grad_down_and_x, "CompositeExplicitAutograd")


@torch.library.register_fake("rosa_scale::grad_h_and_up", lib=_LIBRARY)
def _grad_h_and_up_fake(gs, ups, h, up_dtype):
    return h.new_empty(h.shape, dtype=torch.float32), [up.new_empty(up.shape, dtype=up_dtype) for up in ups]


@torch.library.register_fake("rosa_scale::grad_down_and_x", lib=_LIBRARY)
def _grad_down_and_x_fake(x, down, grad_h, down_dtype):
    return down.new_empty(down.shape, dtype=down_dtype), x.new_empty(x.shape)


grad_h_and_up = torch.ops.rosa_scale.grad_h_and_up.default
grad_down_and_x = torch.ops.rosa_scale.grad_down_and_x.default
