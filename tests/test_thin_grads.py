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
        assert not thin_grads.usable(g.t().contiguous().t(), up, h)  # columns not contiguous
        torch.use_deterministic_algorithms(True)
        try:
            assert not thin_grads.usable(g, up, h)  # atomic sums vary in order: the GEMMs instead
        finally:
            torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens,width,rank", [(4096, 4096, 16), (1000, 1000, 16), (300, 14336, 32), (257, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_h_and_up_match_float64_products(tokens, width, rank, dtype):
    torch.manual_seed(0)
    g = torch.randn(tokens, width, device="cuda", dtype=dtype)
    up = torch.randn(width, rank, device="cuda", dtype=dtype)
    h = torch.randn(tokens, rank, device="cuda", dtype=dtype)
    assert thin_grads.usable(g, up, h)
    for up_dtype in (torch.float32, dtype):
        grad_h, grad_up = thin_grads.grad_h_and_up(g, up, h, up_dtype)
        assert grad_h.dtype == dtype and grad_up.dtype == up_dtype
        assert grad_h.shape == (tokens, rank) and grad_up.shape == (width, rank)
        exact_h, exact_up = g.double() @ up.double(), g.double().t() @ h.double()
        # grad_h is rounded once to the activations' dtype; grad_up keeps fp32 where asked
        unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        assert ((grad_h.double() - exact_h).abs() <= unit * exact_h.abs() + 1e-3).all()
        up_tol = 1e-5 if up_dtype == torch.float32 else unit
        assert (grad_up.double() - exact_up).abs().max() <= up_tol * exact_up.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens,width,rank", [(4096, 4096, 16), (1000, 1000, 16), (300, 14336, 32), (257, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_down_and_x_match_float64_products(tokens, width, rank, dtype):
    torch.manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=dtype)
    down = torch.randn(rank, width, device="cuda", dtype=dtype)
    grad_h = torch.randn(tokens, rank, device="cuda", dtype=dtype)
    assert thin_grads.usable(x, down, grad_h)
    for down_dtype in (torch.float32, dtype):
        grad_down, grad_x = thin_grads.grad_down_and_x(x, down, grad_h, down_dtype)
        assert grad_down.dtype == down_dtype and grad_x.dtype == dtype
        assert grad_down.shape == (rank, width) and grad_x.shape == (tokens, width)
        exact_down, exact_x = grad_h.double().t() @ x.double(), grad_h.double() @ down.double()
        unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        assert ((grad_x.double() - exact_x).abs() <= unit * exact_x.abs() + 1e-3).all()
        down_tol = 1e-5 if down_dtype == torch.float32 else unit
        assert (grad_down.double() - exact_down).abs().max() <= down_tol * exact_down.abs().max()
