"""The fused ROSA layer computes the reference function and gradients, and steps aside where it cannot."""
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from rosa_scale import RosaConfig, apply_rosa
from rosa_scale.layer import RosaLinear
from tests.tiny import tiny_llama


def _layer(base: nn.Module, dtype: torch.dtype, fused: bool, seed: int = 0, rank: int = 3) -> RosaLinear:
    torch.manual_seed(seed)
    for p in base.parameters():
        nn.init.normal_(p)
    layer = RosaLinear(base.to(dtype), rank=rank, adapter_dtype=dtype)
    with torch.no_grad():
        layer.up.normal_()
        layer.down.normal_()
    layer.fused = fused
    return layer


def _reference_float64(layer: RosaLinear, x: torch.Tensor):
    """The layer's function and gradients written out in float64 from its parameters."""
    w = layer.fixed_weight().detach().double()
    bias = layer.base.bias.detach().double() if getattr(layer.base, "bias", None) is not None else 0.0
    up = layer.up.detach().double().requires_grad_()
    down = layer.down.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out = x64 @ w.T + bias + (x64 @ down.T) @ up.T
    return out, x64, up, down


@pytest.mark.parametrize("kind", ["linear", "linear-bias", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_layer_matches_float64_reference_in_value_and_gradients(kind, dtype):
    base = {"linear": lambda: nn.Linear(12, 7, bias=False), "linear-bias": lambda: nn.Linear(12, 7),
            "conv1d": lambda: Conv1D(7, 12)}[kind]()
    layer = _layer(base, dtype, fused=True)
    x = torch.randn(2, 5, 12, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 5, 7, dtype=dtype)
    out = layer(x)
    assert out.grad_fn is not None and "FusedRosaLinear" in type(out.grad_fn).__name__
    out.backward(grad_out)
    ref, x64, up, down = _reference_float64(layer, x)
    ref.backward(grad_out.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol * scale
    for got, want in ((x.grad, x64.grad), (layer.up.grad, up.grad), (layer.down.grad, down.grad)):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()
    assert layer.base.weight.grad is None


def test_fused_and_separate_operations_agree_including_a_trainable_bias():
    fused, separate = (_layer(nn.Linear(10, 6), torch.float64, fused=f) for f in (True, False))
    for layer in (fused, separate):
        layer.base.bias.requires_grad_(True)
    x = torch.randn(4, 10, dtype=torch.float64)
    grads = []
    for layer in (fused, separate):
        xi = x.clone().requires_grad_()
        layer(xi).square().sum().backward()
        grads.append([xi.grad, layer.up.grad, layer.down.grad, layer.base.bias.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_steps_aside_for_hooks_and_mixed_dtypes():
    layer = _layer(nn.Linear(8, 4), torch.float32, fused=True)
    x = torch.randn(3, 8)

    def node(module, inp):
        return type(module(inp).grad_fn).__name__

    assert "FusedRosaLinear" in node(layer, x)
    handle = layer.base.register_forward_pre_hook(lambda m, a: None)  # e.g. ZeRO-3 gathering the weight
    assert "FusedRosaLinear" not in node(layer, x)
    handle.remove()
    mixed = RosaLinear(nn.Linear(8, 4).to(torch.bfloat16), rank=2, adapter_dtype=torch.float32)
    assert "FusedRosaLinear" not in node(mixed, x.to(torch.bfloat16))  # bf16 base, fp32 factors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "FusedRosaLinear" in node(layer, x)
        wide = _layer(nn.Linear(8, 4), torch.float64, fused=True)  # autocast leaves float64 alone: so do we
        assert "FusedRosaLinear" not in node(wide, x.double())
    layer.fused = False
    assert "FusedRosaLinear" not in node(layer, x)


def test_apply_rosa_fused_config_gives_the_same_model_loss_and_gradients():
    batch = torch.randint(0, 100, (2, 16))
    results = []
    for fused in (True, False):
        model = tiny_llama().double()
        apply_rosa(model, RosaConfig(rank=4, fused=fused, adapter_dtype="float32"))
        model.double()
        assert all(layer.fused == fused for layer in model.modules() if isinstance(layer, RosaLinear))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_f, grads_f), (loss_s, grads_s) = results
    torch.testing.assert_close(loss_f, loss_s, rtol=1e-12, atol=1e-12)
    assert grads_f.keys() == grads_s.keys() and len(grads_f) > 0
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_s[name], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rank", [3, 16])  # 16: the output gradient's two products in one kernel
def test_fused_layer_in_bf16_on_cuda_compiled_is_as_accurate_as_separate_operations(rank):
    """cuBLAS with an accumulator (beta=1), compiled: no further from float64 than the separate operations."""
    errors = {}
    for fused in (True, False):
        layer = _layer(nn.Linear(1024, 512), torch.bfloat16, fused=fused, rank=rank).cuda()
        x = torch.randn(4, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad_out = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
        out = torch.compile(layer)(x)
        out.backward(grad_out)
        ref, x64, up, down = _reference_float64(layer, x)
        ref.backward(grad_out.double())
        errors[fused] = [((got.double() - want).abs().max() / want.abs().max()).item()
                         for got, want in ((out, ref), (x.grad, x64.grad), (layer.up.grad, up.grad),
                                           (layer.down.grad, down.grad))]
    assert all(e < 2e-2 for e in errors[True]), errors
    assert all(f <= 1.5 * s + 1e-3 for f, s in zip(errors[True], errors[False])), errors


def test_fused_layer_refuses_a_second_derivative_instead_of_a_wrong_one():
    layer = _layer(nn.Linear(6, 4), torch.float64, fused=True)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def test_compute_dtype_casts_whole_fp32_factors_to_the_base_dtype_and_keeps_fp32_gradients():
    """Factors left whole beside a bf16 base (fsdp_factors: replicated): the forward casts them, so the
    fused node runs in bf16, and their gradients arrive in fp32 as the optimizer holds them."""
    layer = RosaLinear(nn.Linear(16, 8).to(torch.bfloat16), rank=4, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.up.normal_()
        layer.down.normal_()
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    assert "FusedRosaLinear" not in type(layer(x).grad_fn).__name__  # fp32 factors, bf16 base: separate ops
    layer.compute_dtype = torch.bfloat16
    out = layer(x)
    assert out.dtype == torch.bfloat16 and "FusedRosaLinear" in type(out.grad_fn).__name__
    out.float().square().sum().backward()
    assert layer.up.grad.dtype == layer.down.grad.dtype == torch.float32
    ref, _, up, down = _reference_float64(layer, x)
    ref.square().sum().backward()
    for got, want in ((out, ref), (layer.up.grad, up.grad), (layer.down.grad, down.grad)):
        assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_factor_gradients_come_from_the_gemm_accumulator_unrounded():
    """fp32 factors beside a bf16 base: their gradients are the exact products of the bf16 operands up to
    fp32 accumulation, not rounded to bf16 and cast back (which would be ~100x further off)."""
    torch.manual_seed(0)
    layer = RosaLinear(nn.Linear(1024, 512, bias=False).to("cuda", torch.bfloat16), rank=16,
                       adapter_dtype=torch.float32).cuda()
    with torch.no_grad():
        layer.up.normal_()
        layer.down.normal_()
    layer.compute_dtype = torch.bfloat16
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    layer(x).backward(grad_out)
    assert layer.up.grad.dtype == layer.down.grad.dtype == torch.float32
    up, down = layer.up.detach().bfloat16(), layer.down.detach().bfloat16()
    h = x @ down.t()  # the bf16 operand the node multiplies
    grad_h = (grad_out.double() @ up.double()).bfloat16()  # as rounded to bf16 (a rare element may differ by 1 ulp)
    for got, a, b, tol in ((layer.up.grad, grad_out.t(), h, 1e-5), (layer.down.grad, grad_h.t(), x, 2e-4)):
        exact = a.double() @ b.double()
        error = ((got.double() - exact).abs().max() / exact.abs().max()).item()
        rounded = ((got.bfloat16().double() - exact).abs().max() / exact.abs().max()).item()
        assert error < tol and error < rounded / 5, (error, rounded)


def test_kernels_off_leave_the_products_to_the_gemms(monkeypatch):
    """``forward_kernels`` / ``backward_kernels = False`` (layer_bench's and fsdp2_bench's GEMM modes) never
    ask for thin_forward's / thin_grads' kernels, and the other side still does."""
    from rosa_scale import thin_forward, thin_grads

    asked = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # thin_forward's kernel: compiled graphs only
    monkeypatch.setattr(thin_grads, "usable", lambda *operands: asked.append("backward") or False)
    monkeypatch.setattr(thin_forward, "usable", lambda *operands: asked.append("forward") or False)
    layer = _layer(nn.Linear(16, 8), torch.float32, fused=True)
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).sum().backward()
    assert asked == ["forward", "backward", "backward"]  # the output term; the g pair, then the x pair
    asked.clear()
    layer.backward_kernels = False
    layer(x).sum().backward()
    assert asked == ["forward"] and layer.down.grad is not None
    asked.clear()
    layer.forward_kernels, layer.backward_kernels = False, True
    layer(x).sum().backward()
    assert asked == ["backward", "backward"]


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_fused_node_computes_what_autocast_makes_of_the_separate_operations(base_dtype):
    """accelerate's mixed precision runs the forward under autocast: the fused node then computes in
    autocast's dtype, as the base's and the adapter's linears would apart, and returns each gradient in its
    input's dtype (fp32 factors' in fp32)."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        layer = RosaLinear(nn.Linear(64, 32).to(base_dtype), rank=4, adapter_dtype=torch.float32)
        with torch.no_grad():
            layer.up.normal_()
            layer.down.normal_()
        layer.fused = fused
        x = torch.randn(6, 64, dtype=base_dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        assert ("FusedRosaLinear" in type(out.grad_fn).__name__) == fused
        out.float().square().sum().backward()
        assert x.grad.dtype == base_dtype and layer.up.grad.dtype == layer.down.grad.dtype == torch.float32
        results.append([out.detach(), x.grad, layer.up.grad, layer.down.grad])
        ref, x64, up, down = _reference_float64(layer, x)
        ref.square().sum().backward()
        for got, want in zip(results[-1], (ref, x64.grad, up.grad, down.grad)):  # bf16 arithmetic, both ways
            assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max()
    for a, b in zip(*results):
        assert (a.double() - b.double()).abs().max() <= 3e-2 * b.double().abs().max()


@pytest.mark.parametrize("base_dtype,compute_dtype,autocast", [
    (torch.float32, None, False), (torch.bfloat16, torch.bfloat16, False),  # one dtype; whole fp32 factors
    (torch.float32, None, True), (torch.bfloat16, None, True)])             # accelerate's mixed precision
def test_the_fused_node_compiles_as_one_graph_and_computes_what_it_does_eagerly(base_dtype, compute_dtype, autocast):
    """A graph break here would split every compiled decoder layer: dynamo must trace the node whole."""
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layer = RosaLinear(nn.Linear(64, 32, bias=False).to(base_dtype), rank=16, adapter_dtype=torch.float32)
        with torch.no_grad():
            layer.up.normal_()
            layer.down.normal_()
        layer.compute_dtype = compute_dtype
        layers.append(layer)
    x = torch.randn(2, 8, 64, dtype=base_dtype)
    outs = []
    for layer, run in zip(layers, (torch.compile(layers[0], fullgraph=True, backend="aot_eager"), layers[1])):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(xi)
        out.float().square().sum().backward()
        outs.append([out, xi.grad, layer.up.grad, layer.down.grad])
    assert "FusedRosaLinear" in type(outs[1][0].grad_fn).__name__
    for compiled, eager in zip(*outs):
        assert compiled.dtype == eager.dtype
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
