"""The adapter's backward products in pairs from one read (Triton on CUDA) against float64."""
import pytest
import torch

from rosa_scale import thin_grads


def test_the_kernel_stands_aside_where_it_cannot_run():
    g, up, h = torch.randn(8, 32), torch.randn(32, 16), torch.randn(8, 16)
    assert not thin_grads.usable(g, up, h)  # CPU tensors: the GEMMs run
    if torch.cuda.is_available():
        g, up, h = (t.cuda().bfloat16() for t in (g, up, h))
        assert thin_grads.usable(g, up, h)
        assert not thin_grads.usable(g, up[:, :12].contiguous(), h[:, :12].contiguous())  # rank 12
        assert thin_grads.usable(g, *(torch.randn(n, 48, device="cuda", dtype=torch.bfloat16) for n in (32, 8)))
        assert not thin_grads.usable(g, *(torch.randn(n, 129, device="cuda", dtype=torch.bfloat16) for n in (32, 8)))
        assert not thin_grads.usable(g.t().contiguous().t(), up, h)  # columns not contiguous
        big = torch.empty(2 ** 31 // 4096, 4096, device="cuda", dtype=torch.bfloat16)  # 2^31 numbers: 64-bit offsets
        assert not thin_grads.usable(big, torch.empty(4096, 16, device="cuda", dtype=torch.bfloat16),
                                     torch.empty(big.shape[0], 16, device="cuda", dtype=torch.bfloat16))
        del big
        torch.use_deterministic_algorithms(True)
        try:
            assert not thin_grads.usable(g, up, h)  # atomic sums vary in order: the GEMMs instead
        finally:
            torch.use_deterministic_algorithms(False)


def _up_side(tokens, width, rank, dtype):
    """g (tokens x out), up (out x r), h (tokens x r) -> grad_h (tokens x r), grad_up (out x r)."""
    g, up, h = (torch.randn(*shape, device="cuda", dtype=dtype) for shape in ((tokens, width), (width, rank),
                                                                              (tokens, rank)))
    exact = (g.double() @ up.double(), g.double().t() @ h.double())  # (activation-side, factor-side)
    return (g, up, h), thin_grads.grad_h_and_up, exact, lambda out: (out[0], out[1])


def _down_side(tokens, width, rank, dtype):
    """x (tokens x in), down (r x in), grad_h (tokens x r) -> grad_down (r x in), grad_x part (tokens x in)."""
    x, down, grad_h = (torch.randn(*shape, device="cuda", dtype=dtype) for shape in ((tokens, width), (rank, width),
                                                                                     (tokens, rank)))
    exact = (grad_h.double() @ down.double(), grad_h.double().t() @ x.double())
    return (x, down, grad_h), thin_grads.grad_down_and_x, exact, lambda out: (out[1], out[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("side", [_up_side, _down_side], ids=["g-up-and-g^T-h", "grad_h^T-x-and-grad_h-down"])
@pytest.mark.parametrize("tokens,width,rank", [(4096, 4096, 16), (1000, 1000, 16), (300, 14336, 32), (257, 64, 64),
                                               (777, 4096, 48), (129, 1024, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_pair_matches_float64_products(side, tokens, width, rank, dtype):
    torch.manual_seed(0)
    operands, op, (exact_act, exact_factor), order = side(tokens, width, rank, dtype)
    assert thin_grads.usable(*operands)
    for factor_dtype in (torch.float32, dtype):
        act, factor = order(op(*operands, factor_dtype))
        assert act.dtype == dtype and factor.dtype == factor_dtype
        assert act.shape == exact_act.shape and factor.shape == exact_factor.shape
        # the activation-sized result is rounded once to the activations' dtype; the factor's keeps fp32 where asked
        unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        assert ((act.double() - exact_act).abs() <= unit * exact_act.abs() + 1e-3).all()
        factor_tol = 1e-5 if factor_dtype == torch.float32 else unit
        assert (factor.double() - exact_factor).abs().max() <= factor_tol * exact_factor.abs().max()
