"""ROSA over a frozen bitsandbytes base (NF4, FP4, int8) on CPU: the function is kept across
resamples, what each window learned survives (where in-place re-quantization loses it), training
touches the factors only, merging gives plain linear layers, and DDP replicas stay bit-identical."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'rosa-scale[bnb]')")

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, merge_rosa, resample, rosa_layers  # noqa: E402
from rosa_scale.config import ConfigError, load_config  # noqa: E402
from rosa_scale.export import merged_state_dict  # noqa: E402
from rosa_scale.factorize import window_generator  # noqa: E402
from rosa_scale.guard import nonfinite_layers  # noqa: E402
from rosa_scale.quant import QuantRosaLinear, dequantize, quantize_linear, refuse_quantized  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.tiny import tiny_llama  # noqa: E402

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _train_like(model, gen, size=0.01):
    """Move every factor by ``size`` of its mean magnitude, as some optimizer steps would."""
    for p in adapter_parameters(model):
        p.add_(torch.randn(p.shape, generator=gen) * size * p.abs().mean())


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


@pytest.mark.parametrize("quantize,stack_dtype,tol", [
    ("nf4", "bfloat16", 2e-2), ("fp4", "bfloat16", 2e-2), ("int8", "bfloat16", 2e-2), ("nf4", "float32", 3e-4)])
def test_resample_keeps_the_function(quantize, stack_dtype, tol):
    """Across each of 3 resamples the logits move by at most ``tol`` times what the window's training
    moved them. Nothing is re-quantized: the folded update is only stored in the stack's dtype,
    rounding it by 2^-9 of itself in bf16 (measured 0.2-0.5% of the change; the bound 2%); in float32
    the first fold is bitwise the window (measured 0) and later ones differ by fp32 summation order
    (measured <= 4e-5; the bound 3e-4). Re-quantizing the merge would move them by about the whole
    change (test_merged_updates_survive measures what it keeps)."""
    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=4, quantize=quantize, stack_dtype=stack_dtype))
    # 4-bit in eval mode: bitsandbytes' CPU inference path must not repack the base (keep_standard_layout).
    # int8 in training mode: in eval mode (and on GPUs) Linear8bitLt also rounds its inputs to int8 per row,
    # so any change of a layer's input, however small, moves its output by that rounding.
    model.train(quantize == "int8")
    gen = torch.Generator().manual_seed(1)
    for k in range(3):
        start = _logits(model)
        _train_like(model, gen)
        before = _logits(model)
        resample(model)
        after = _logits(model)
        trained = (before - start).abs().max()
        assert trained > 1e-3  # the window really changed the function
        assert (after - before).abs().max() <= tol * trained, (k, (after - before).abs().max() / trained)
    layer = rosa_layers(model)["model.layers.0.mlp.up_proj"]
    assert layer.stack_up.shape == (96, 3 * 2 * 4) and layer.stack_down.shape == (3 * 2 * 4, 64)
    assert layer.stack_up.dtype == getattr(torch, stack_dtype)


def _effective64(layer: QuantRosaLinear) -> torch.Tensor:
    """What the layer's weight is, from its stored tensors, in float64 (no rounding of ours)."""
    t = [x.double() for x in (layer.up, layer.down, layer.up0, layer.down0, layer.stack_up, layer.stack_down)]
    up, down, up0, down0, stack_up, stack_down = t
    return dequantize(layer.base).double() + stack_up @ stack_down + up @ down - up0 @ down0


@pytest.mark.parametrize("stack_dtype,max_error", [("float32", 1e-5), ("bfloat16", 5e-3)])
def test_merged_updates_survive(stack_dtype, max_error):
    """K=5 windows, each changing up/down by a known update D_k of 1% of |W|, each followed by a
    resample: the effective weight moves by exactly sum D_k (relative error measured 6e-9 with an
    fp32 stack, 2.3e-3 with bf16). In-place NF4 re-quantization of the same merges (dequantize, add,
    quantize again) keeps 0.95% of them: a design that re-quantizes fails this test."""
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    linear = nn.Linear(256, 256, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    cfg = RosaConfig(rank=8, quantize="nf4", stack_dtype=stack_dtype)
    layer = QuantRosaLinear(quantize_linear(linear, "nf4"), 8, stack_dtype=getattr(torch, stack_dtype))
    layer.resplit_(window_generator(0, 0, "w"), cfg)
    start = _effective64(layer)
    gen = torch.Generator().manual_seed(2)
    total = torch.zeros_like(start)
    requantized = dequantize(layer.base)
    with torch.no_grad():
        for k in range(1, 6):
            old = layer.up.double() @ layer.down.double()
            du, dd = torch.randn(layer.up.shape, generator=gen), torch.randn(layer.down.shape, generator=gen)
            scale = 0.01 * start.norm() / (du.double() @ layer.down.double() + layer.up.double() @ dd.double()).norm()
            layer.up.add_(du * scale.float())
            layer.down.add_(dd * scale.float())
            update = layer.up.double() @ layer.down.double() - old
            total += update
            q, state = bf.quantize_4bit(requantized + update.float(), blocksize=64, compress_statistics=True,
                                        quant_type="nf4")
            requantized = bf.dequantize_4bit(q, state).float()
            layer.resplit_(window_generator(0, k, "w"), cfg)
    assert 0.005 < update.norm() / start.norm() < 0.02
    error = ((_effective64(layer) - start - total).norm() / total.norm()).item()
    kept = ((requantized.double() - dequantize(layer.base).double()) * total).sum() / (total * total).sum()
    assert error < max_error
    assert kept < 0.2, f"in-place NF4 re-quantization kept {kept:.1%} of the merged updates"
    assert layer.stack_up.shape == (256, 5 * 2 * 8)


@pytest.mark.parametrize("optimizer_name", ["AdamW", "AdamW8bit", "PagedAdamW8bit"])
def test_train_step_resample_step_touches_only_the_factors(optimizer_name):
    """Loss falls through a resample; gradients reach up/down only. bitsandbytes' AdamW8bit keeps
    per-parameter state (state1/2 in uint8, absmax1/2, qmap1/2, step): the resample's reset drops
    it and the optimizer starts it again (step 1) at the next step."""
    import bitsandbytes as bnb

    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=4, quantize="nf4"))
    params = adapter_parameters(model)
    ids = {id(p) for p in params}
    if optimizer_name == "AdamW":
        optimizer = torch.optim.AdamW(params, lr=2e-2)
    else:  # 8-bit state even for the tiny factors
        optimizer = getattr(bnb.optim, optimizer_name)(params, lr=2e-2, min_8bit_size=64)
    batch = IDS[:1]
    losses = []
    for step in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in ids), name
        assert all(b.grad is None for b in model.buffers())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 2:
            if optimizer_name != "AdamW":
                state = optimizer.state[params[0]]
                assert state["state1"].dtype == state["state2"].dtype == torch.uint8 and "absmax1" in state
            resample(model, optimizer)
            assert not optimizer.state  # the factors' Adam state starts again
        if step == 3 and optimizer_name != "AdamW":
            assert int(optimizer.state[params[0]]["step"]) == 1
    assert adapter_parameters(model) == params  # the optimizer still holds the model's factors
    assert losses[-1] < losses[3] < losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_gives_plain_linear_layers_with_the_same_outputs(dtype):
    """Merged: plain nn.Linear in the model's dtype, holding deq(Q0) + S + the window. Its logits
    differ from the quantized model's only by the stack's bf16 forward (x and the stack's output in
    bf16: ~2^-8 of the trained change; bound 3%), and in a bf16 model also by bf16 rounding of the
    merged weights and of every activation: bound twice what running this model in bf16 instead of
    fp32 changes (measured 0.11 of logits up to 4.7; the merged model differed by 0.14)."""
    model = tiny_llama()
    bf16_noise = (_logits(model) - _logits(model.to(torch.bfloat16)).float()).abs().max() if dtype != torch.float32 else 0
    model = tiny_llama().to(dtype)
    original = _logits(model).float()
    apply_rosa(model, RosaConfig(rank=4, quantize="nf4")).eval()
    gen = torch.Generator().manual_seed(3)
    _train_like(model, gen, 0.05)
    resample(model)
    _train_like(model, gen, 0.05)
    quantized = _logits(model).float()
    exported = merged_state_dict(model)
    merged = merge_rosa(model)
    assert exported.keys() == merged.state_dict().keys()
    for key, value in merged.state_dict().items():
        assert torch.equal(exported[key], value), key
    plain = _logits(merged).float()
    targets = [m for m in merged.modules() if type(m) is nn.Linear]
    assert len(targets) == 2 * 7 + 1 and all(m.weight.dtype == dtype for m in targets)
    assert not any(type(m).__module__.startswith("bitsandbytes") or isinstance(m, QuantRosaLinear)
                   for m in merged.modules())
    assert not hasattr(merged, "rosa_state") and not merged._ddp_params_and_buffers_to_ignore
    tol = 0.03 * (quantized - original).abs().max() + 2 * bf16_noise
    assert (plain - quantized).abs().max() <= tol


def test_rosa_tensors_load_into_a_fresh_model_with_a_shorter_stack():
    """The base is quantized again from the original weights (the same codes); loading the ROSA tensors
    (factors, frozen copies, stack, bound, window count) resizes the stack and continues exactly:
    same logits, and the next resample gives bitwise what the first model's gives."""
    from rosa_scale.quant import ROSA_TENSORS

    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=4, quantize="nf4"))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        _train_like(model, gen, 0.05)
        resample(model)
    _train_like(model, gen, 0.05)
    saved = {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ROSA_TENSORS}
    fresh = tiny_llama()
    apply_rosa(fresh, RosaConfig(rank=4, quantize="nf4"))
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.rsplit(".", 1)[-1] in ROSA_TENSORS]
    assert torch.equal(_logits(fresh), _logits(model))
    fresh.rosa_state.split_index = model.rosa_state.split_index  # as a resume restores it
    resample(model)
    resample(fresh)
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in ROSA_TENSORS:
            assert torch.equal(fresh.state_dict()[key], value), key
    assert int(rosa_layers(fresh)["model.layers.0.mlp.up_proj"].windows) == 4


def test_guard_reads_the_stack_bound_and_the_factors():
    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=4, quantize="int8"))
    layers = rosa_layers(model)
    assert nonfinite_layers(layers) == []
    layer = layers["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        layer.up[0, 0] = float("nan")
    assert nonfinite_layers(layers) == ["model.layers.1.self_attn.v_proj (up)"]
    with torch.no_grad():
        layer.up[0, 0] = 3e38
    assert nonfinite_layers(layers) == ["model.layers.1.self_attn.v_proj (w_fixed + up @ down overflows)"]


def test_refusals_are_one_line():
    from rosa_scale.engines.zero3 import Zero3Engine

    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=4, quantize="fp4"))
    layers = rosa_layers(model)
    for call in (lambda: Zero3Engine().resplit(model, layers, 1, model.rosa_state.config),
                 lambda: refuse_quantized(layers, "DeepSpeed ZeRO-3")):
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value) == ("config key 'rosa.quantize' (fp4) is not supported under DeepSpeed ZeRO-3: "
                                  "train a quantized base in one process, under DDP or FSDP2")
    assert load_config(overrides={"rosa.quantize": "nf4"}).rosa.quantize == "nf4"
    with pytest.raises(ConfigError, match=r"^config key 'quantize' must be"):
        apply_rosa(tiny_llama(), RosaConfig(quantize="nf8"))
    prequantized = tiny_llama()
    prequantized.model.layers[0].mlp.up_proj = quantize_linear(prequantized.model.layers[0].mlp.up_proj, "nf4")
    with pytest.raises(ConfigError, match=r"^config key 'rosa.quantize' is 'int8' but target module "
                                          r"'model.layers.0.mlp.up_proj' is already quantized as nf4"):
        apply_rosa(prequantized, RosaConfig(quantize="int8"))
    assert not hasattr(prequantized, "rosa_state") and type(prequantized.model.layers[0].mlp.down_proj) is nn.Linear


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantization_error_fit_is_its_top_singular_part(tmp_path, quantize):
    """quant_error_rank=k starts the stack at the best rank-k fit of ``W0 - deq(Q0)``: what is left of the
    error is its singular values past k (float64 SVD reference), the first split keeps the function, and a
    model loaded quantized by transformers gets the same stack from its originals (refused without them)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, k = tiny_llama(), 6
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    apply_rosa(model, RosaConfig(rank=4, quantize=quantize, quant_error_rank=k, stack_dtype="float32"))
    for name, layer in rosa_layers(model).items():
        error = originals[name].double() - dequantize(layer.base).double()
        rest = torch.linalg.svdvals(error)[k:].square().sum().sqrt()
        left = torch.linalg.matrix_norm(error - layer.stack_up.double() @ layer.stack_down.double())
        assert layer.stack_up.shape[1] == k and abs(left - rest) <= 1e-5 * error.norm(), name
        fitted = originals[name].double() - error + layer.stack_up.double() @ layer.stack_down.double()
        torch.testing.assert_close(layer.merged_weight().double(), fitted, rtol=0, atol=1e-6)  # the split kept it
    tiny_llama().save_pretrained(tmp_path / "plain")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32) if quantize == "nf4" \
        else BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    loaded = [AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=bnb, device_map="cpu")
              for _ in range(2)]
    with pytest.raises(ConfigError, match="quant_error_rank' needs the original weights"):
        apply_rosa(loaded[0], RosaConfig(rank=4, quantize=quantize, quant_error_rank=k))
    apply_rosa(loaded[1], RosaConfig(rank=4, quantize=quantize, quant_error_rank=k, stack_dtype="float32"),
               originals=originals)
    for name, layer in rosa_layers(loaded[1]).items():
        assert torch.equal(layer.stack_up, rosa_layers(model)[name].stack_up), name


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_model_loaded_with_bitsandbytes_config(tmp_path, quantization):
    """A model transformers loaded quantized keeps its quantized layers as the frozen base
    (quantize 'none' or the same kind); merged, it is a plain bf16 model again that saves and loads
    without bitsandbytes, with the merged outputs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16) if quantization == "nf4" \
        else BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=bnb_config,
                                                 dtype=torch.bfloat16, device_map="cpu")
    apply_rosa(model, RosaConfig(rank=4, quantize="none" if quantization == "nf4" else "int8"))
    assert len(rosa_layers(model)) == 14 and all(isinstance(m, QuantRosaLinear) for m in rosa_layers(model).values())
    gen = torch.Generator().manual_seed(4)
    _train_like(model, gen, 0.05)
    resample(model)
    _train_like(model, gen, 0.05)
    trained = _logits(model).float()
    merge_rosa(model).save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.bfloat16 and type(reloaded.model.layers[1].mlp.down_proj) is nn.Linear
    assert (_logits(reloaded).float() - trained).abs().max() <= 0.05 * trained.abs().max()  # bf16 model: see above


def test_ddp_replicas_end_bit_identical(tmp_path):
    """2 gloo processes, each on its own data, 4 steps and 2 resamples: the stacks, the frozen and the
    trained factors are bitwise equal on both ranks, and the stacks hold both finished windows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "state.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.quant_ddp_worker", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank really saw its own data
    for name, tensors in ranks[0]["layers"].items():
        assert tensors["stack_up"].shape[1] == 2 * 2 * 4, name
        for key, value in tensors.items():
            assert torch.equal(value, ranks[1]["layers"][name][key]), (name, key)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["nf4", "fp4"])
def test_on_gpu_bf16_resample_and_merge(quantize):
    """The same invariants on CUDA kernels with a bf16 model: a resample moves the logits by at most 2%
    of what the window's training moved them plus bf16 rounding (what running the model in bf16
    instead of fp32 changes: the resample changes how the bf16 matmuls split the weight); the merged
    plain model differs from the quantized one by 3% of the trained change plus twice that rounding."""
    ids = IDS.cuda()
    model = tiny_llama().cuda()
    with torch.no_grad():
        bf16_noise = (model(ids).logits - model.to(torch.bfloat16)(ids).logits.float()).abs().max()
    apply_rosa(model, RosaConfig(rank=4, quantize=quantize)).eval()
    assert all(layer.base.weight.is_cuda for layer in rosa_layers(model).values())
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        start = model(ids).logits.float()
        for p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen).cuda() * 0.05 * p.abs().mean())
        before = model(ids).logits.float()
    resample(model)
    with torch.no_grad():
        after = model(ids).logits.float()
    trained = (before - start).abs().max()
    moved = (after - before).abs().max()
    assert moved <= 0.02 * trained + bf16_noise, (moved.item(), trained.item(), bf16_noise.item())
    merged = merge_rosa(model)
    with torch.no_grad():
        plain = merged(ids).logits.float()
    gap = (plain - after).abs().max()
    assert gap <= 0.03 * trained + 2 * bf16_noise, (gap.item(), trained.item(), bf16_noise.item())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_dequantization_reads_the_codes_as_cuda_does(quant_type):
    """rosa_scale's CPU dequantization equals bitsandbytes' where its CPU kernel is right (widths that
    are multiples of the 64-code block) and, 96 wide, where that kernel misreads the codes, it gives back
    the quantized weight to within one quantization step (the kernel's values are off by far more)."""
    import bitsandbytes.functional as bf

    from rosa_scale.quant import dequantize_4bit

    gen = torch.Generator().manual_seed(0)
    for shape, bnb_right in (((96, 64), True), ((64, 96), False)):
        w = torch.randn(shape, generator=gen).to(torch.bfloat16)
        packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
        ours = dequantize_4bit(packed, state)
        assert ours.dtype == torch.bfloat16 and ours.shape == w.shape
        step = 0.35 * w.abs().max()  # the widest gap between neighbouring 4-bit codes, times absmax
        assert (ours.float() - w.float()).abs().max() < step
        if bnb_right:
            assert torch.equal(ours, bf.dequantize_4bit(packed, state))
