"""The adapter's output terms ``h_i up_i^T + b_i`` of a group's members in one launch (CUDA, Triton).

Each term is an output-sized write from a reduction only r long, which the member's base GEMM then reads
back as its accumulator (rosa_scale/fused_linear.py). cuBLAS runs one GEMM per member at ~2.8 TB/s of
writes on an H200 at Llama-3-8B's shapes (q, k and v as three launches, k's and v's too small to fill the
GPU); one program per output tile here writes them all in one launch at up to ~3.7 TB/s
(bench/results/fwd-micro-2026-12-02-1gpu.json). Rounded once from fp32, as cuBLAS rounds them.
Ranks below 16 (the tensor cores' smallest side) and CPU tensors take the GEMMs.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs, or a torch before triton_op: the GEMMs do the work
    triton = None

MEMBERS_PER_LAUNCH = 3  # q, k, v: the widest group of the architectures rosa_scale groups by default


def usable(h: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel writes ``h up^T + bias``: CUDA half-precision operands in one dtype, ``h`` a
    tokens x r operand with rows of unit stride (a column slice of a group's ``h`` is fine), ``up``
    contiguous, a rank from 16 to 128, offsets within the kernel's 32-bit index arithmetic."""
    tokens, (width, rank) = h.shape[0], up.shape
    return (triton is not None and h.is_cuda and h.dim() == 2 and h.stride(1) == 1
            and h.dtype in (torch.bfloat16, torch.float16) and up.dtype == h.dtype and up.is_contiguous()
            and (bias is None or (bias.dtype == h.dtype and bias.dim() == 1 and bias.is_contiguous()))
            and 16 <= rank <= 128 and tokens * width < 2 ** 31 and h.stride(0) * tokens < 2 ** 31)


if triton is not None:
    @triton.jit
    def _adapter_terms_kernel(h, up0, up1, up2, bias0, bias1, bias2, out0, out1, out2, width0, width1, width2,
                              blocks0, blocks01, tokens, h_row_stride, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (j, i): column block j of the members' outputs side by side, row block i."""
        program = tl.program_id(0)
        if program < blocks0:
            up, bias, out, width, column, block = up0, bias0, out0, width0, 0, program
        elif program < blocks01:
            up, bias, out, width, column, block = up1, bias1, out1, width1, RANK, program - blocks0
        else:
            up, bias, out, width, column, block = up2, bias2, out2, width2, 2 * RANK, program - blocks01
        rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, RANK_PAD)
        row_ok, col_ok, rank_ok = rows < tokens, cols < width, ranks < RANK
        h_rows = tl.load(h + rows[:, None] * h_row_stride + column + ranks[None, :],
                         mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        up_cols = tl.load(up + cols[None, :] * RANK + ranks[:, None], mask=rank_ok[:, None] & col_ok[None, :],
                          other=0.0)
        tile = tl.dot(h_rows, up_cols)
        if HAS_BIAS:
            tile += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rows[:, None] * width + cols[None, :], tile.to(out.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _launch(h: torch.Tensor, ups: list, biases: list) -> list[torch.Tensor]:
    """One launch for up to three members of one rank, all with a bias or none; ``h`` holds their ``h_i``
    side by side."""
    tokens, rank = h.shape[0], ups[0].shape[1]
    outs = [torch.empty(tokens, up.shape[0], device=h.device, dtype=h.dtype) for up in ups]
    block_t, block_n = 64, 128  # measured on an H200 (bench/results/fwd-micro-2026-12-02-1gpu.json)
    blocks = [triton.cdiv(up.shape[0], block_n) for up in ups] + [0, 0]
    # unused output slots get a spare number each (a compiled graph copies what a kernel may write:
    # repeating a real output there would alias it)
    out_args = outs + [h.new_empty(1) for _ in range(MEMBERS_PER_LAUNCH - len(outs))]
    up_args = slots(ups, ups[0])
    bias_args = slots(biases, biases[0]) if biases[0] is not None else slots([], h)
    grid = (sum(blocks), triton.cdiv(tokens, block_t))
    wrap_triton(_adapter_terms_kernel)[grid](
        h, *up_args, *bias_args, *out_args, *(u.shape[0] for u in up_args), blocks[0], blocks[0] + blocks[1],
        tokens, h.stride(0), rank, triton.next_power_of_2(rank), biases[0] is not None, block_t, block_n,
        num_warps=4)
    return outs


def slots(items: list, fill) -> list:
    """``items`` padded with ``fill`` to a launch's MEMBERS_PER_LAUNCH arguments (no program reaches the
    padding)."""
    return items + [fill] * (MEMBERS_PER_LAUNCH - len(items))


def runs(keys: list, limit: int) -> list[tuple[int, int]]:
    """``[first, end)`` index ranges of consecutive equal ``keys``, each at most ``limit`` long: the members
    that one launch takes."""
    out, first = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[first] or i - first == limit:
            out.append((first, i))
            first = i
    return out


def _adapter_terms(h: torch.Tensor, ups: list[torch.Tensor],
                   biases: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """``h_i up_i^T + b_i`` for each member (``h``: every member's ``h_i`` side by side, in order): members
    next to each other that share a rank and whether they have a bias go in one launch, three at most.
    A ``triton_op``: a compiled graph launches the kernel as it launches its own (a Python launch through
    Triton's JIT costs several GEMM launches of host time, and the forward's host time is the step's
    limit where the GPU runs ahead)."""
    outs, ranks = [], [up.shape[1] for up in ups]
    for first, end in runs([(r, b is not None) for r, b in zip(ranks, biases)], MEMBERS_PER_LAUNCH):
        column = sum(ranks[:first])
        outs += _launch(h[:, column:column + ranks[first] * (end - first)], ups[first:end], biases[first:end])
    return outs


if triton is not None:
    _adapter_terms = triton_op("rosa_scale::adapter_terms", mutates_args=())(_adapter_terms)


def adapter_terms(h: torch.Tensor, ups: list[torch.Tensor], biases: list, kernels: bool) -> list[torch.Tensor]:
    """Each member's ``h_i up_i^T + b_i`` (``h_i``: ``h``'s columns in the members' order) as fresh tensors
    the base GEMMs may accumulate into: one launch per group where the kernel applies to every member
    (``kernels``) in a graph being compiled, a GEMM per member otherwise. Run eagerly, a launch through
    Triton's Python JIT costs ~60 us of host time against ~17 for a GEMM (an H200 machine's host,
    bench/results/host-2026-12-02-launch.json): more than the launch saves on the GPU (~11 us a group)."""
    hs = h.split([up.shape[1] for up in ups], dim=1)
    if kernels and torch.compiler.is_compiling() and all(usable(h_i, up, b) for h_i, up, b in zip(hs, ups, biases)):
        return list(torch.ops.rosa_scale.adapter_terms.default(h, ups, biases))
    return [h_i @ up.t() if b is None else torch.addmm(b, h_i, up.t()) for h_i, up, b in zip(hs, ups, biases)]
