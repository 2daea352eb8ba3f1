"""``grad_h = g @ up`` and ``grad_up = g^T @ h`` from one read of the output gradient ``g`` (CUDA, Triton).

Both products of the adapter's backward stream the whole ``tokens x out`` output gradient while computing
a rank-r result; as two cuBLAS GEMMs (each split over its long reduction and reduced again) they read it
twice and take 1.3-1.9x the time of this kernel at Llama-3-8B's shapes on an H200, where each program
multiplies one tile of ``g`` both ways and adds its parts into fp32 results. The sums are made with atomic
adds, so their rounding order varies between runs: under ``torch.use_deterministic_algorithms(True)`` the
two GEMMs run instead. Elsewhere (CPU, no Triton, ranks that are not a power of two >= 16) likewise.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the GEMMs do the work
    triton = None

_LIBRARY = torch.library.Library("rosa_scale", "FRAGMENT")
_LIBRARY.define("grad_h_and_up(Tensor g, Tensor up, Tensor h, ScalarType up_dtype) -> (Tensor, Tensor)")


def usable(g: torch.Tensor, up: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether the kernel computes this backward: CUDA half-precision operands in one dtype, a
    power-of-two rank of at least 16, unit stride along the rows, deterministic algorithms off."""
    rank = up.shape[-1]
    return (triton is not None and g.is_cuda and g.dtype in (torch.bfloat16, torch.float16)
            and up.dtype == h.dtype == g.dtype and rank >= 16 and rank & (rank - 1) == 0
            and g.dim() == 2 and g.stride(1) == 1 and up.is_contiguous() and h.is_contiguous()
            and not torch.are_deterministic_algorithms_enabled())


if triton is not None:
    @triton.jit
    def _grad_h_and_up_kernel(g, up, h, grad_h, grad_up, tokens, width, g_row_stride,
                              RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                              STEPS: tl.constexpr):
        """Program (i, j): rows block i of ``g`` against STEPS column blocks from j * STEPS."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ranks = tl.arange(0, RANK)
        row_ok = rows < tokens
        h_rows = tl.load(h + rows[:, None] * RANK + ranks[None, :], mask=row_ok[:, None], other=0.0)
        grad_h_rows = tl.zeros([BLOCK_T, RANK], tl.float32)
        for step in range(STEPS):
            cols = (tl.program_id(1) * STEPS + step) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < width
            tile = tl.load(g + rows[:, None] * g_row_stride + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            up_cols = tl.load(up + cols[:, None] * RANK + ranks[None, :], mask=col_ok[:, None], other=0.0)
            grad_h_rows += tl.dot(tile, up_cols)
            tl.atomic_add(grad_up + cols[:, None] * RANK + ranks[None, :], tl.dot(tl.trans(tile), h_rows),
                          mask=col_ok[:, None], sem="relaxed")
        tl.atomic_add(grad_h + rows[:, None] * RANK + ranks[None, :], grad_h_rows, mask=row_ok[:, None],
                      sem="relaxed")


def _grad_h_and_up(g: torch.Tensor, up: torch.Tensor, h: torch.Tensor, up_dtype: torch.dtype):
    tokens, width = g.shape
    rank = up.shape[1]
    sums = torch.zeros(tokens + width, rank, device=g.device, dtype=torch.float32)  # one fill for both
    grad_h, grad_up = sums[:tokens], sums[tokens:]
    steps = 8 if width >= 4096 else 4  # measured on an H200 (bench/results/thin-grads-2026-12-01-1gpu.json)
    grid = (triton.cdiv(tokens, 128), triton.cdiv(width, 64 * steps))
    _grad_h_and_up_kernel[grid](g, up, h, grad_h, grad_up, tokens, width, g.stride(0), rank, 128, 64, steps,
                                num_warps=4, num_stages=4 if steps == 8 else 3)
    return grad_h.to(g.dtype), grad_up.to(up_dtype)


_LIBRARY.impl("grad_h_and_up", _grad_h_and_up, "CompositeExplicitAutograd")


@torch.library.register_fake("rosa_scale::grad_h_and_up", lib=_LIBRARY)
def _grad_h_and_up_fake(g, up, h, up_dtype):
    return g.new_empty(g.shape[0], up.shape[1]), up.new_empty(up.shape, dtype=up_dtype)


grad_h_and_up = torch.ops.rosa_scale.grad_h_and_up.default
