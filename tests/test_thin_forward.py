"""The forward's output terms of a group in one launch (Triton on CUDA) against float64."""
import pytest
import torch

from rosa_scale import thin_forward


def test_members_of_one_rank_and_bias_kind_share_launches_of_three_at_most():
    assert thin_forward.runs([16, 16, 16], 3) == [(0, 3)]
    assert thin_forward.runs([16] * 5, 3) == [(0, 3), (3, 5)]
    assert thin_forward.runs([(16, True), (16, False), (16, False), (32, False)], 3) == [(0, 1), (1, 3), (3, 4)]
    assert thin_forward.runs([], 3) == []


def test_the_kernel_stands_aside_where_it_cannot_run():
    h, up = torch.randn(8, 16), torch.randn(32, 16)
    assert not thin_forward.usable(h, up, None)  # CPU tensors: the GEMMs run
    outs = thin_forward.adapter_terms(h, [up], [torch.randn(32)], kernels=True)
    assert len(outs) == 1 and outs[0].shape == (8, 32)
    assert torch.compile(lambda *a: thin_forward.adapter_terms(*a, kernels=True)[0])(h, [up], [None]).shape == (8, 32)
    if torch.cuda.is_available():
        h, up = h.cuda().bfloat16(), up.cuda().bfloat16()
        assert thin_forward.usable(h, up, None)
        assert thin_forward.usable(h, up, torch.randn(32, device="cuda", dtype=torch.bfloat16))
        assert not thin_forward.usable(h, up, torch.randn(32, device="cuda"))  # an fp32 bias
        assert not thin_forward.usable(h[:, :12], up[:, :12].contiguous(), None)  # rank 12
        assert not thin_forward.usable(h, up.t().contiguous().t(), None)  # up not contiguous
        assert not thin_forward.usable(h.t().contiguous().t(), up, None)  # h's columns strided
        assert not thin_forward.usable(h, up.half(), None)
        assert thin_forward.usable(torch.randn(8, 40, device="cuda", dtype=torch.bfloat16)[:, 4:20], up, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("widths,ranks", [((4096,), (16,)), ((4096, 1024, 1000), (16, 16, 16)),
                                          ((1000, 300, 64, 4096, 130), (16, 16, 16, 16, 16)),
                                          ((14336, 200), (32, 32)), ((777,), (48,)), ((520, 64), (80, 24))])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_term_matches_float64_as_closely_as_the_gemm(widths, ranks, bias, dtype):
    """``h_i up_i^T + b_i`` per member, ``h`` a column slice of a wider tensor: within the GEMM's error of the
    float64 product (both round once from fp32 sums), and never more than one rounding off."""
    torch.manual_seed(0)
    tokens = 1000
    h = torch.randn(tokens, sum(ranks) + 24, device="cuda", dtype=dtype)[:, 8:8 + sum(ranks)]
    ups = [torch.randn(w, r, device="cuda", dtype=dtype) for w, r in zip(widths, ranks)]
    biases = [torch.randn(w, device="cuda", dtype=dtype) if bias else None for w in widths]
    assert all(thin_forward.usable(h_i, up, b) for h_i, up, b in zip(h.split(ranks, 1), ups, biases))
    got = torch.ops.rosa_scale.adapter_terms.default(h, ups, biases)  # the kernel, launched eagerly
    gemm = thin_forward.adapter_terms(h, ups, biases, kernels=True)  # eagerly: the GEMMs
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for out, ref, h_i, up, b in zip(got, gemm, h.split(ranks, 1), ups, biases):
        exact = h_i.double() @ up.double().t() + (b.double() if b is not None else 0)
        assert out.shape == exact.shape and out.dtype == dtype and out.is_contiguous()
        error = (out.double() - exact).abs()
        assert (error <= unit * exact.abs() + 1e-3).all()
        assert error.max() <= 1.5 * (ref.double() - exact).abs().max() + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_graph_launches_the_kernel_and_an_eager_call_the_gemms():
    """Compiled: one launch of the kernel for the group, the same numbers as the kernel run eagerly.
    Eager: cuBLAS (a Python launch through Triton's JIT costs more host time than it saves)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    h = torch.randn(512, 48, device="cuda", dtype=torch.bfloat16)
    ups = [torch.randn(w, 16, device="cuda", dtype=torch.bfloat16) for w in (256, 64, 64)]
    terms = torch.compile(lambda h, ups: thin_forward.adapter_terms(h, ups, [None] * 3, kernels=True))
    terms(h, ups)
    kernel_names = []
    for run in (lambda: terms(h, ups), lambda: thin_forward.adapter_terms(h, ups, [None] * 3, kernels=True)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            outs = run()
            torch.cuda.synchronize()
        kernel_names.append([e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA])
        if len(kernel_names) == 1:
            compiled = outs
    assert sum("_adapter_terms_kernel" in n for n in kernel_names[0]) == 1, kernel_names[0]
    assert not any("_adapter_terms_kernel" in n for n in kernel_names[1]), kernel_names[1]
    for a, b in zip(compiled, torch.ops.rosa_scale.adapter_terms.default(h, ups, [None] * 3)):
        assert torch.equal(a, b)
