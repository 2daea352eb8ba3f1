"""bench/step_profile.py sorts a step's GPU kernels by kind from their names (H200 names seen in a trace)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import step_profile  # noqa: E402


def test_kernel_names_fall_into_their_kinds():
    seen = {"nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
            "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
            "triton_poi_fused__unsafe_view_add_mul_silu_5": "triton",
            "Memcpy DtoD (Device -> Device)": "copy",
            "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "nccl",
            "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda>": "copy",
            "void at::native::(anonymous namespace)::cunn_SoftMaxBackward<4, float>": "other"}
    assert {name: step_profile.kind(name) for name in seen} == seen


def test_a_cpu_profile_has_no_kernels_and_a_table_of_its_ops():
    x = torch.randn(64, 64)
    stats, table = step_profile.profile_steps(lambda: (x @ x).sum(), steps=2)
    assert stats["profile_steps"] == 2 and stats["kernel_ms_per_step"] == 0.0 and stats["span_ms_per_step"] == 0.0
    assert "aten::mm" in table


def test_busy_time_counts_overlapping_kernels_once():
    """Two streams' kernels overlapping count once; a gap between them is idle time, not busy time."""
    from types import SimpleNamespace as NS

    kernels = [NS(time_range=NS(start=a, end=b)) for a, b in ((0, 1000), (500, 1500), (2000, 2500), (2100, 2200))]
    assert step_profile.busy_ms(kernels) == 2.0  # microseconds in, milliseconds out: 1500 + 500
    assert step_profile.busy_ms([]) == 0.0
