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
        assert thin_grads.usable(g, up, torch.randn(8, 40, device="cuda", dtype=torch.bfloat16)[:, 4:20])  # a slice
        assert thin_grads.usable(g, up, h.float())  # fp32 sums
        assert not thin_grads.usable(g, up, h.t().contiguous().t())  # the thin operand's columns strided
        assert not thin_grads.usable(g, up, h.half())  # another half dtype
        big = torch.empty(2 ** 31 // 4096, 4096, device="cuda", dtype=torch.bfloat16)  # 2^31 numbers: 64-bit offsets
        assert not thin_grads.usable(big, torch.empty(4096, 16, device="cuda", dtype=torch.bfloat16),
                                     torch.empty(big.shape[0], 16, device="cuda", dtype=torch.bfloat16))
        del big
        torch.use_deterministic_algorithms(True)
        try:
            assert not thin_grads.usable(g, up, h)  # atomic sums vary in order: the GEMMs instead
        finally:
            torch.use_deterministic_algorithms(False)


def _thin(tokens, rank, dtype, layout):
    """A tokens x r operand: contiguous, a column slice of a wider tensor (a group's ``h``), or fp32 sums."""
    if layout == "slice":
        return torch.randn(tokens, rank + 16, device="cuda", dtype=dtype)[:, 8:8 + rank]
    return torch.randn(tokens, rank, device="cuda", dtype=torch.float32 if layout == "fp32" else dtype)


def _up_side(tokens, width, rank, dtype, layout):
    """g (tokens x out), up (out x r), h (tokens x r) -> grad_h (tokens x r, fp32), grad_up (out x r)."""
    g, up = (torch.randn(*shape, device="cuda", dtype=dtype) for shape in ((tokens, width), (width, rank)))
    h = _thin(tokens, rank, dtype, layout)
    exact = (g.double() @ up.double(), g.double().t() @ h.to(dtype).double())  # (activation-side, factor-side)
    return (g, up, h), lambda g, up, h, dtype: thin_grads.grad_h_and_up([g], [up], h, dtype), exact, \
        lambda out: (out[0], out[1][0])


def _down_side(tokens, width, rank, dtype, layout):
    """x (tokens x in), down (r x in), grad_h (tokens x r) -> grad_down (r x in), grad_x part (tokens x in)."""
    x, down = (torch.randn(*shape, device="cuda", dtype=dtype) for shape in ((tokens, width), (rank, width)))
    grad_h = _thin(tokens, rank, dtype, layout)
    rounded = grad_h.to(dtype).double()  # an fp32 grad_h is rounded to x's dtype as it is loaded
    exact = (rounded @ down.double(), rounded.t() @ x.double())
    return (x, down, grad_h), thin_grads.grad_down_and_x, exact, lambda out: (out[1], out[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("side", [_up_side, _down_side], ids=["g-up-and-g^T-h", "grad_h^T-x-and-grad_h-down"])
@pytest.mark.parametrize("tokens,width,rank,layout", [(4096, 4096, 16, "contiguous"), (1000, 1000, 16, "slice"),
                                                      (300, 14336, 32, "fp32"), (257, 64, 64, "contiguous"),
                                                      (777, 4096, 48, "slice"), (129, 1024, 80, "fp32"),
                                                      (300, 14336, 16, "slice")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_pair_matches_float64_products(side, tokens, width, rank, layout, dtype):
    torch.manual_seed(0)
    operands, op, (exact_act, exact_factor), order = side(tokens, width, rank, dtype, layout)
    assert thin_grads.usable(*operands)
    for factor_dtype in (torch.float32, dtype):
        act, factor = order(op(*operands, factor_dtype))
        assert factor.dtype == factor_dtype
        assert act.shape == exact_act.shape and factor.shape == exact_factor.shape
        unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        if side is _up_side:  # grad_h leaves as its fp32 sums, unrounded
            assert act.dtype == torch.float32
            assert (act.double() - exact_act).abs().max() <= 1e-5 * exact_act.abs().max()
        else:  # the activation-sized result is rounded once to the activations' dtype
            assert act.dtype == dtype
            assert ((act.double() - exact_act).abs() <= unit * exact_act.abs() + 1e-3).all()
        factor_tol = 1e-5 if factor_dtype == torch.float32 else unit  # the factor's keeps fp32 where asked
        assert (factor.double() - exact_factor).abs().max() <= factor_tol * exact_factor.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_fp32_sliced_grad_h_gives_what_its_rounded_contiguous_copy_gives():
    """The row stride and the in-kernel rounding change nothing: the written x-sized part is bit for bit the
    same (the rank-sized sums are atomic adds, equal up to their order)."""
    torch.manual_seed(0)
    x = torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(48, 4096, device="cuda", dtype=torch.bfloat16)
    wide = torch.randn(1000, 64, device="cuda", dtype=torch.float32)
    sliced = wide[:, 16:]
    grad_down, grad_x = thin_grads.grad_down_and_x(x, down, sliced, torch.float32)
    grad_down_ref, grad_x_ref = thin_grads.grad_down_and_x(x, down, sliced.bfloat16().contiguous(), torch.float32)
    assert torch.equal(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_down, grad_down_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("widths,ranks", [((4096, 1024, 1000), (16, 48, 16)),  # a launch per member
                                          ((4096, 1024, 1000, 64, 300), (16,) * 5),  # launches of 3 and 2
                                          ((14336, 4096), (16, 16))])  # wide enough for the longest steps
def test_a_group_in_one_call_matches_float64_products_per_member(widths, ranks):
    """Members of different widths and ranks, their h side by side: grad_h side by side, each grad_up
    (members of one rank share a launch; each g a column slice of a wider tensor, its own row stride)."""
    torch.manual_seed(0)
    tokens = 700
    gs = [torch.randn(tokens, w + 8 * i, device="cuda", dtype=torch.bfloat16)[:, :w] for i, w in enumerate(widths)]
    ups = [torch.randn(w, r, device="cuda", dtype=torch.bfloat16) for w, r in zip(widths, ranks)]
    h = torch.randn(tokens, sum(ranks), device="cuda", dtype=torch.bfloat16)
    grad_h, grad_ups = thin_grads.grad_h_and_up(gs, ups, h, torch.float32)
    assert grad_h.shape == (tokens, sum(ranks)) and grad_h.dtype == torch.float32
    exact_h = torch.cat([g.double() @ up.double() for g, up in zip(gs, ups)], dim=1)
    assert (grad_h.double() - exact_h).abs().max() <= 1e-5 * exact_h.abs().max()
    for g, up, h_i, grad_up in zip(gs, ups, h.split(ranks, dim=1), grad_ups):
        exact = g.double().t() @ h_i.double()
        assert grad_up.dtype == torch.float32 and grad_up.shape == up.shape
        assert (grad_up.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
