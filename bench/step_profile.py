"""Where a training step's GPU time goes: a torch.profiler trace of a few steps, its kernels summed by
kind (GEMMs, attention, compiled Triton kernels, copies, NCCL, other), per step.

Used by ``fsdp2_bench.py --profile N``. Kernels of several streams overlap, so the GPU's busy time is the
union of their intervals; the span less that union is the time the GPU waited (for the host, or for a
collective). The key-averages table's "Command Buffer Full" row is the opposite: the host waiting for the GPU.
"""
from __future__ import annotations

import collections
from typing import Callable

import torch

KINDS = (("nccl", ("nccl",)), ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "matmul")), ("triton", ("triton",)),
         ("copy", ("copy", "memcpy", "memset")))


def kind(kernel: str) -> str:
    """The kind of a GPU kernel, from its name."""
    name = kernel.lower()
    return next((k for k, words in KINDS if any(w in name for w in words)), "other")


def busy_ms(kernels: list) -> float:
    """Milliseconds in which at least one of ``kernels`` (profiler events) ran: the union of their intervals."""
    total, end = 0.0, None
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in kernels):
        if end is None or start > end:
            total, end = total + (stop - start), stop
        elif stop > end:
            total, end = total + (stop - end), stop
    return total / 1e3


def profile_steps(step: Callable[[], None], steps: int, by_name: bool = False) -> tuple[dict, str]:
    """Run ``step`` ``steps`` times under the profiler (CPU and CUDA): per-step kernel milliseconds and
    counts by kind, the span from the first kernel's start to the last one's end, and the key-averages
    table (top 30 by GPU time). ``by_name``: also ``kernel_us_by_name``, [name, us per step, calls per step]
    of every kernel, longest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ms, count = collections.Counter(), collections.Counter()
    for e in kernels:
        ms[kind(e.name)] += e.device_time_total / 1e3
        count[kind(e.name)] += 1
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3 if kernels else 0.0
    busy = busy_ms(kernels)
    out = {"profile_steps": steps, "span_ms_per_step": span / steps, "busy_ms_per_step": busy / steps,
           "idle_ms_per_step": (span - busy) / steps,
           "kernel_ms_per_step": sum(ms.values()) / steps,
           **{f"kernel_ms_{k}": v / steps for k, v in ms.items()},
           **{f"kernels_{k}": c // steps for k, c in count.items()}}
    if by_name:
        us, calls = collections.Counter(), collections.Counter()
        for e in kernels:
            us[e.name] += e.device_time_total
            calls[e.name] += 1
        out["kernel_us_by_name"] = [[name, total / steps, calls[name] / steps] for name, total in us.most_common()]
    sort = "self_cuda_time_total" if kernels else "self_cpu_time_total"
    return out, prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=80)
