"""One training step over a 4-bit base on one GPU: ROSA (nf4, frozen stack) vs PEFT QLoRA (nf4).

    python3 bench/quant_bench.py --out FILE.json                     # one GPU, Llama-3-8B shape
    python3 bench/quant_bench.py --chunked-loss --out FILE.json      # the same, loss over token chunks
    python3 bench/quant_bench.py --shape 70b --out FILE.json         # Llama-3-70B shape, built layer by layer
    python3 bench/quant_bench.py --tiny --out /tmp/q.json            # CPU smoke check, tiny Llama

Why: a quantized base is where ROSA and QLoRA compete (a 4-bit Llama-3-8B fits a small GPU, a
4-bit 70B one H200); this measures what one step costs in time and memory for each, on the same
NF4 base (``rosa_scale.quant.quantize_linear``: Linear4bit, double quantization, bf16 compute).

Modes (each in a fresh subprocess, so each peak is its own; ``--in-process`` runs them in turn):

    rosa_nf4             apply_rosa(quantize="nf4"), torch AdamW on the factors
    rosa_nf4_adamw8bit   the same with bitsandbytes AdamW8bit
    qlora_nf4            the targets replaced by the same Linear4bit layers, PEFT LoRA (r, alpha 2r), AdamW
    rosa_bf16            ROSA over the plain bf16 base, for reference

All: random bf16 weights, gradient checkpointing (non-reentrant), random token ids as inputs and
labels, ``--warmup`` untimed steps then ``--steps`` timed ones. Per mode: median step seconds,
tokens/s, peak GiB of the timed steps and of warm-up + timed steps, the model's GiB before and
after quantization, and for ROSA one full ``resample(model, optimizer)`` (seconds, peak GiB).
Flat JSON, rewritten after every mode; a failed mode leaves its error line.

``--chunked-loss``: the loss of ``rosa_scale.chunked_loss`` (the LM head and cross-entropy over
``--loss-chunk`` tokens at a time, recomputed in the backward) in place of the model's own, whose
fp32 full-vocabulary logits and their gradient are ~4 GiB of an 8B step at B=2, S=2048.

``--layerwise`` (implied by ``--shape 70b``): the model is built on the meta device and each
decoder layer is materialized on the GPU in bf16 with random values, quantized and wrapped
(its first split made) before the next one, so the whole model never exists in bf16 anywhere:
a 70B model is 131 GiB in bf16, ~37 GiB over NF4.

``--init-method`` makes the first split with another factorizer than the resample's (``qr``
saves the minutes of an ``eigh`` split whose windows a speed measurement does not need).
``--resample-budget-s``: before the resample, the split of every distinct matrix shape is timed
once with ``--method`` (nothing written), and the whole-model time estimated from it
(``resample_est_s_*``); if the estimate exceeds the budget the resample runs with ``qr``
(``resample_method_*`` says which ran).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rosa_scale without an install

MODES = ("rosa_nf4", "rosa_nf4_adamw8bit", "qlora_nf4", "rosa_bf16")
# key suffix of each mode in the JSON: peak_gib_<shape>_<suffix>, tok_s_<shape>_<suffix>, ...
SUFFIX = {"rosa_nf4": "nf4_rosa", "rosa_nf4_adamw8bit": "nf4_rosa_adamw8bit", "qlora_nf4": "nf4_qlora",
          "rosa_bf16": "bf16_rosa"}
GIB = 2**30
# Llama-3 shapes (untied head, vocab 128,256) and the batch each is measured at; --tiny is the CPU check
SHAPES = {
    "8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, seq=2048, batch=2,
               warmup=3, steps=8),
    "70b": dict(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, seq=2048, batch=1,
                warmup=1, steps=3),
    "tiny": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=300, seq=32, batch=2,
                 warmup=1, steps=2),
}
SHAPE_KEYS = tuple(SHAPES["8b"])


def parse_args(argv=None) -> argparse.Namespace:
    """Command line (plain argparse: the parent process never imports torch)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file (flat keys), rewritten after every mode")
    p.add_argument("--modes", nargs="+", default=None, help="subset of " + " ".join(MODES) +
                   " (default: all; rosa_nf4 for --shape 70b)")
    p.add_argument("--shape", choices=list(SHAPES), default="8b", help="Llama-3 shape and its batch (default 8b)")
    p.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (hidden 64, 2 layers, seq 32, 2 steps)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, cpu with --tiny")
    for key in SHAPE_KEYS:  # each overrides the shape's value
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--rank", type=int, default=16, help="ROSA / LoRA rank")
    p.add_argument("--method", default="eigh", choices=["eigh", "svd", "qr"], help="ROSA factorizer of the resample")
    p.add_argument("--init-method", default=None, choices=["eigh", "svd", "qr"],
                   help="factorizer of the first split (default: --method)")
    p.add_argument("--resample-budget-s", type=float, default=None,
                   help="resample with qr if the estimated --method resample takes longer (default: no estimate)")
    p.add_argument("--skip-resample", action="store_true", help="no resample after the timed steps")
    p.add_argument("--chunked-loss", action="store_true", help="rosa_scale.chunked_loss instead of the model's loss")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of --chunked-loss")
    p.add_argument("--layerwise", action="store_true",
                   help="build on meta, quantize and wrap one decoder layer at a time (implied by --shape 70b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true", help="all modes in this process (peaks reset between)")
    p.add_argument("--mode-timeout", type=float, default=240.0, help="seconds one mode's subprocess may take")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one mode, result JSON to --out
    args = p.parse_args(argv)
    if args.tiny or args.shape == "tiny":
        args.tiny, args.shape = True, "tiny"
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = args.modes or (["rosa_nf4"] if args.shape == "70b" else list(MODES))
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    args.layerwise = args.layerwise or args.shape == "70b"
    if args.shape == "70b" and "rosa_bf16" in args.modes:
        p.error("rosa_bf16 at the 70b shape needs 131 GiB for the bf16 base alone: leave it out")
    args.init_method = args.init_method or args.method
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    return args


def log(msg: str) -> None:
    print(f"[quant_bench] {msg}", flush=True)


def write(result: dict, path: str) -> None:
    """Atomic rewrite, so a run killed mid-mode leaves the earlier modes' numbers."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def error_line(err: BaseException) -> str:
    """The last line of the traceback (``OutOfMemoryError: CUDA out of memory ...``), kept short."""
    return "".join(traceback.format_exception_only(err)).strip().splitlines()[-1][:400]


# ---------------------------------------------------------------- one mode (imports torch) ---

def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gib(dev, peak: bool = False):
    """Allocated (or peak allocated) GiB on the GPU; None on CPU."""
    import torch

    if dev.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(dev) if peak else torch.cuda.memory_allocated(dev)) / GIB


def reset_peak(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def free(dev) -> None:
    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 8192), rope_theta=500000.0, tie_word_embeddings=False,
    )


def prepare_for_training(model):
    """Train mode, gradient checkpointing as a QLoRA run uses it; the embedding output is made to
    require grad so backward reaches every layer whatever the checkpointing flavour."""
    from rosa_scale.run_model import enable_checkpointing

    model.config.use_cache = False
    model.train()
    enable_checkpointing(model)
    model.enable_input_require_grads()
    return model


def build_model(args, dev):
    """Llama-shaped causal LM, random bf16 weights initialized on the device (fast there)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(llama_config(args), dtype=torch.bfloat16, attn_implementation="sdpa")
    return prepare_for_training(model)


def materialize_(module, dev, generator, std: float) -> None:
    """Give ``module``'s meta parameters storage on ``dev`` and random values as Llama's own init
    draws them: matrices N(0, std), norm weights 1, biases 0. Only this module's memory is taken."""
    import torch

    module.to_empty(device=dev)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def materialize_buffers_(model, dev) -> None:
    """Buffers computed at construction (rotary ``inv_freq``) cannot be filled in after ``to_empty``:
    re-create their module on ``dev`` from the model's config. Anything else left on meta is an error."""
    import torch

    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "inv_freq"):
                raise RuntimeError(f"buffer of {name} ({type(module).__name__}) is still on the meta device")
            with torch.device(dev):
                fresh = type(module)(config=model.config)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fresh)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{len(left)} tensors are still on the meta device, e.g. {left[0]}")


def meta_model(args):
    """The Llama-shaped model with every parameter on the meta device (no memory), frozen; and which
    parameters required grad before (what ``merge_rosa`` restores)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(args), dtype=torch.bfloat16, attn_implementation="sdpa")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    return model, requires_grad


def materialize_layerwise_(model, dev, convert, seed: int) -> float:
    """Each decoder layer of a meta ``model``, in order, materialized on ``dev`` in bf16 with random
    values and handed to ``convert(prefix, layer)`` (quantize, wrap) before the next one, so at most
    one layer's bf16 weights exist at a time; the embeddings, final norm and head last.
    Returns the largest GiB one bf16 decoder layer took."""
    import torch

    std = model.config.initializer_range
    generator = torch.Generator(device=dev).manual_seed(seed)
    layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is layers)
    layer_gib = 0.0
    for i, layer in enumerate(layers):
        materialize_(layer, dev, generator, std)
        layer_gib = max(layer_gib, sum(p.numel() * p.element_size() for p in layer.parameters()) / GIB)
        convert(f"{prefix}.{i}", layer)
    for module in (model.get_input_embeddings(), model.get_output_embeddings(), model.get_decoder().norm):
        materialize_(module, dev, generator, std)
    materialize_buffers_(model, dev)
    return layer_gib


def build_model_layerwise(args, dev, convert):
    """``meta_model`` then ``materialize_layerwise_``: (model ready for training, GiB of one bf16
    layer, which parameters required grad before they were frozen)."""
    model, requires_grad = meta_model(args)
    layer_gib = materialize_layerwise_(model, dev, convert, args.seed)
    return prepare_for_training(model), layer_gib, requires_grad


def rosa_configs(args, quantize: str):
    """(config of the run, config of the first split): they differ only in the factorizer."""
    from dataclasses import replace

    from rosa_scale import RosaConfig

    config = RosaConfig(rank=args.rank, quantize=quantize, target_modules="all-linear", method=args.method,
                        seed=args.seed)
    return config, replace(config, method=args.init_method)


def rosa_layer_converter(config, init_config):
    """``convert(prefix, layer)`` for ``build_model_layerwise``: what ``apply_rosa`` does to one decoder
    layer's targets (quantize, wrap, first split on the window of the full module name, so the
    windows are the ones ``apply_rosa`` on the whole model would draw)."""
    import torch
    from rosa_scale.factorize import window_generator
    from rosa_scale.layer import RosaLinear, linear_shape, resolve_rank
    from rosa_scale.model import _DTYPES, _set_submodule, find_target_modules
    from rosa_scale.quant import check_target, wrap_quantized

    adapter_dtype = _DTYPES[config.adapter_dtype]

    @torch.no_grad()
    def convert(prefix: str, layer) -> None:
        for name in find_target_modules(layer, config):
            linear, full = layer.get_submodule(name), f"{prefix}.{name}"
            check_target(full, linear, config)
            rank = resolve_rank(config.rank, *linear_shape(linear))
            if config.quantize != "none":
                wrapped = wrap_quantized(linear, rank, config, adapter_dtype, linear.weight.dtype)
            else:
                wrapped = RosaLinear(linear, rank, adapter_dtype)
            _set_submodule(layer, name, wrapped)
            wrapped.resplit_(window_generator(config.seed, 0, full), init_config)

    return convert


def apply_rosa_layerwise(args, dev, config, init_config):
    """The model built layer by layer with ROSA in every layer, and the model-level ROSA state
    ``resample`` reads (as ``apply_rosa`` leaves it after its first split)."""
    from rosa_scale.model import RosaState
    from rosa_scale.quant import ignore_in_ddp

    model, layer_gib, requires_grad = build_model_layerwise(args, dev, rosa_layer_converter(config, init_config))
    ignore_in_ddp(model)
    model.rosa_state = RosaState(config=config, split_index=0, requires_grad=requires_grad)
    return model, layer_gib


def make_optimizer(params, optim: str):
    import torch

    if optim == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def setup_rosa(args, dev, quantize: str, optim: str):
    """ROSA on every linear layer but the LM head (quantized for nf4), first split with
    ``--init-method``, the run's config (``--method``) kept for the resample; then the optimizer."""
    from rosa_scale import adapter_parameters, apply_rosa
    from rosa_scale.model import rosa_state

    config, init_config = rosa_configs(args, quantize)
    sync(dev)
    start = time.perf_counter()
    if args.layerwise:
        model, layer_gib = apply_rosa_layerwise(args, dev, config, init_config)
        extra = {"model_gib_bf16": None, "layer_gib_bf16": layer_gib}
    else:
        model = build_model(args, dev)
        extra = {"model_gib_bf16": gib(dev)}
        sync(dev)
        start = time.perf_counter()
        apply_rosa(model, init_config)
        rosa_state(model).config = config
    sync(dev)
    extra["apply_rosa_s"] = time.perf_counter() - start
    free(dev)  # the replaced bf16 layers
    extra["model_gib"] = gib(dev)
    return model, make_optimizer(adapter_parameters(model), optim), extra


def qlora_layer_converter(names_out: list):
    """``convert(prefix, layer)``: every linear of the layer replaced by rosa_scale's NF4 Linear4bit."""
    from rosa_scale import RosaConfig
    from rosa_scale.model import _set_submodule, find_target_modules
    from rosa_scale.quant import quantize_linear

    def convert(prefix: str, layer) -> None:
        for name in find_target_modules(layer, RosaConfig(target_modules="all-linear")):
            _set_submodule(layer, name, quantize_linear(layer.get_submodule(name), "nf4"))
            names_out.append(f"{prefix}.{name}")

    return convert


def setup_qlora(args, dev):
    """The same targets as ROSA's 'all-linear', each replaced by rosa_scale's own NF4 Linear4bit (so both
    bases are bit-identical), then PEFT LoRA over them (PEFT's bnb 4-bit LoRA layer), AdamW."""
    from peft import LoraConfig, get_peft_model
    from rosa_scale import RosaConfig
    from rosa_scale.model import _set_submodule, find_target_modules
    from rosa_scale.quant import quantize_linear

    sync(dev)
    start = time.perf_counter()
    if args.layerwise:
        names: list = []
        model, layer_gib, _ = build_model_layerwise(args, dev, qlora_layer_converter(names))
        extra = {"model_gib_bf16": None, "layer_gib_bf16": layer_gib}
    else:
        model = build_model(args, dev)
        extra = {"model_gib_bf16": gib(dev)}
        sync(dev)
        start = time.perf_counter()
        names = find_target_modules(model, RosaConfig(target_modules="all-linear"))
        for name in names:
            _set_submodule(model, name, quantize_linear(model.get_submodule(name), "nf4"))
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # PEFT picks its bitsandbytes Linear4bit LoRA layer on this flag
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=sorted({n.rsplit(".", 1)[-1] for n in names}))
    model = get_peft_model(model, lora)
    sync(dev)
    extra["quantize_peft_s"] = time.perf_counter() - start
    free(dev)
    extra["model_gib"] = gib(dev)
    extra["lora_layer_types"] = ",".join(sorted({type(m).__module__ + "." + type(m).__name__
                                                 for m in model.modules() if hasattr(m, "lora_A")}))
    return model, make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw"), extra


def loss_of(model, ids, args):
    """The step's loss: the model's own (full logits), or ``chunked_causal_lm_loss`` with --chunked-loss."""
    if args.chunked_loss:
        from rosa_scale.chunked_loss import chunked_causal_lm_loss

        return chunked_causal_lm_loss(model, ids, ids, chunk_tokens=args.loss_chunk)
    return model(input_ids=ids, labels=ids).loss


def train_step(model, opt, ids, args):
    loss = loss_of(model, ids, args)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def check_chunked_loss(model, ids, args) -> dict:
    """Both losses of the first batch without gradients, in the model's dtype: the chunked one must
    agree with the model's own on the real shape too (bf16 logits upcast per chunk, as the model does)."""
    import torch

    from rosa_scale.chunked_loss import chunked_causal_lm_loss

    with torch.no_grad():
        plain = float(model(input_ids=ids, labels=ids).loss)
        chunked = float(chunked_causal_lm_loss(model, ids, ids, chunk_tokens=args.loss_chunk))
    return {"loss_model_check": plain, "loss_chunked_check": chunked}


def estimate_resample_s(model, config, dev) -> tuple[float, dict]:
    """Seconds a whole-model resample with ``config.method`` would take, from one timed split per
    distinct (out, in) shape of the model's ROSA layers (nothing is written), times how many
    layers have that shape; and the per-shape seconds. A small split first warms the solver up."""
    import torch
    from rosa_scale import rosa_layers
    from rosa_scale.factorize import split

    layers = list(rosa_layers(model).values())
    split(torch.randn(64, 64, device=dev), 4, method=config.method)
    per_shape: dict = {}
    for layer in layers:
        shape = (layer.out_features, layer.in_features)
        if shape in per_shape:
            continue
        w = layer.merged_weight()
        sync(dev)
        t0 = time.perf_counter()
        split(w, layer.rank, method=config.method, sampling=config.sampling,
              generator=torch.Generator().manual_seed(0), overwrite=True)
        sync(dev)
        per_shape[shape] = time.perf_counter() - t0
        del w
    total = sum(per_shape[(layer.out_features, layer.in_features)] for layer in layers)
    return total, {f"{o}x{i}": s for (o, i), s in per_shape.items()}


def measure_resample(model, opt, ids, args, dev, suffix: str) -> dict:
    """One full ``resample(model, optimizer)`` (with qr if --resample-budget-s says the estimated
    --method one would take longer), its seconds and peak, and one step after it."""
    from dataclasses import replace

    from rosa_scale import resample, rosa_layers
    from rosa_scale.model import rosa_state

    out = {}
    state = rosa_state(model)
    if args.resample_budget_s is not None:
        est, per_shape = estimate_resample_s(model, state.config, dev)
        out[f"resample_est_s_{args.method}_{suffix}"] = est
        out[f"split_s_{args.method}_per_shape_{suffix}"] = per_shape
        log(f"estimated {args.method} resample: {est:.1f} s (budget {args.resample_budget_s:.0f} s)")
        if est > args.resample_budget_s:
            state.config = replace(state.config, method="qr")
    out[f"resample_method_{suffix}"] = state.config.method
    out[f"resample_matrices_{suffix}"] = len(rosa_layers(model))
    before = gib(dev)
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    resample(model, opt)
    sync(dev)
    out[f"resample_s_{suffix}"] = time.perf_counter() - t0
    out[f"resample_peak_gib_{suffix}"] = gib(dev, peak=True)
    out[f"resample_extra_gib_{suffix}"] = None if before is None else out[f"resample_peak_gib_{suffix}"] - before
    out[f"loss_after_resample_{suffix}"] = float(train_step(model, opt, ids, args))  # a step after it still runs
    log(f"resample ({state.config.method}) {out[f'resample_s_{suffix}']:.2f} s")
    return out


def run_mode(mode: str, args) -> dict:
    """Set ``mode`` up on a fresh model, time its steps (and a resample for ROSA); flat keys."""
    import torch

    dev = torch.device(args.device)
    suffix = f"{args.shape}_{SUFFIX[mode]}"
    reset_peak(dev)
    sync(dev)
    start = time.perf_counter()
    if mode == "qlora_nf4":
        model, opt, extra = setup_qlora(args, dev)
    else:
        model, opt, extra = setup_rosa(args, dev, "none" if mode == "rosa_bf16" else "nf4",
                                       "adamw8bit" if mode.endswith("adamw8bit") else "adamw")
    out = {f"setup_s_{suffix}": time.perf_counter() - start, f"setup_peak_gib_{suffix}": gib(dev, peak=True)}
    out.update({f"{k}_{suffix}": v for k, v in extra.items()})
    out[f"trainable_params_{suffix}"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{mode}: set up in {out[f'setup_s_{suffix}']:.1f} s, model {extra['model_gib_bf16']} GiB in bf16 -> "
        f"{extra['model_gib']} GiB (setup peak {out[f'setup_peak_gib_{suffix}']})")
    if dev.type == "cuda" and extra["model_gib_bf16"] is not None:  # the bf16 targets must be gone
        out[f"base_freed_{suffix}"] = mode == "rosa_bf16" or extra["model_gib"] < 0.5 * extra["model_gib_bf16"]

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)
    if args.chunked_loss:
        out.update({f"{k}_{suffix}": v for k, v in check_chunked_loss(model, ids, args).items()})
    reset_peak(dev)
    losses = [float(train_step(model, opt, ids, args)) for _ in range(args.warmup)]
    sync(dev)
    warm_peak = gib(dev, peak=True)
    reset_peak(dev)
    times = []
    for _ in range(args.steps):
        sync(dev)
        t0 = time.perf_counter()
        loss = train_step(model, opt, ids, args)
        sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    peak = gib(dev, peak=True)
    step = statistics.median(times)
    losses = [float(x) for x in losses]
    out.update({
        f"step_s_{suffix}": step, f"tok_s_{suffix}": args.batch * args.seq / step,
        f"step_s_each_{suffix}": [round(t, 4) for t in times],
        f"peak_gib_{suffix}": peak,
        f"peak_gib_with_warmup_{suffix}": None if peak is None else max(peak, warm_peak),
        f"loss_first_{suffix}": losses[0], f"loss_last_{suffix}": losses[-1],
    })
    log(f"{mode}: {out[f'tok_s_{suffix}']:.0f} tok/s, step {step * 1e3:.1f} ms, peak {peak} GiB")

    if mode != "qlora_nf4" and not args.skip_resample:
        out.update(measure_resample(model, opt, ids, args, dev, suffix))
    del model, opt
    free(dev)
    return out


def header(args) -> dict:
    """What ran where (versions, device, shape, which rosa_scale source)."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "bench"))
    from fsdp2_bench import source_id  # git HEAD + hash of rosa_scale/**/*.py

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError as err:
            versions[name] = f"missing: {err}"
    cuda = args.device == "cuda" and torch.cuda.is_available()
    return {
        "bench": "quant_bench", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "device": args.device, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        **versions, "shape": args.shape, "layers": args.layers, "hidden": args.hidden,
        "intermediate": args.intermediate, "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab,
        "tie_word_embeddings": False, "dtype": "bfloat16", "attn": "sdpa", "batch": args.batch, "seq": args.seq,
        "rank": args.rank, "lora_alpha": 2 * args.rank, "rosa_method": args.method, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "gradient_checkpointing": "non-reentrant",
        "quant": "nf4, double quant, bf16 compute", "init_method": args.init_method,
        "resample_budget_s": args.resample_budget_s,
        "loss": f"chunked ({args.loss_chunk} tokens)" if args.chunked_loss else "model's own (full logits)",
        "build": "layer by layer from meta" if args.layerwise else "whole bf16 model on the device, then converted",
        "modes": args.modes, "in_process": args.in_process, **source_id(),
    }


def child(args) -> int:
    """One mode in this process; its keys (or its error line) go to ``--out``."""
    result = header(args)
    try:
        result.update(run_mode(args.child, args))
        rc = 0
    except Exception as err:  # OOM, a missing API: one line, the traceback to stderr
        traceback.print_exc()
        result[f"error_{args.shape}_{SUFFIX[args.child]}"] = error_line(err)
        rc = 1
    write(result, args.out)
    return rc


# ---------------------------------------------------------------- the run (no torch here) ---

def child_argv(args, mode: str, out: str) -> list[str]:
    """The command line of one mode's subprocess: every setting explicit."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--out", out, "--device", args.device]
    names = SHAPE_KEYS + ("shape", "rank", "method", "init_method", "loss_chunk", "seed")
    for name in names + (("resample_budget_s",) if args.resample_budget_s is not None else ()):
        argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    flags = [f"--{name.replace('_', '-')}" for name in ("tiny", "layerwise", "chunked_loss", "skip_resample")
             if getattr(args, name)]
    return argv + flags + ["--modes", *args.modes]


def run_subprocess(args, mode: str) -> dict:
    """``mode`` in a fresh interpreter (its own CUDA context and peak); its JSON, or an error key."""
    tmp = f"{args.out}.{mode}.json"
    key = f"error_{args.shape}_{SUFFIX[mode]}"
    try:
        proc = subprocess.run(child_argv(args, mode, tmp), timeout=args.mode_timeout)
    except subprocess.TimeoutExpired:
        return {key: f"timed out after {args.mode_timeout:.0f} s"}
    try:
        part = json.loads(Path(tmp).read_text())
        Path(tmp).unlink()
    except (OSError, ValueError):
        part = {}
    if proc.returncode and key not in part:
        part[key] = f"subprocess exited with code {proc.returncode}"
    return part


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    result: dict = {}
    log(f"modes {args.modes}, shape {args.shape}, batch {args.batch}, seq {args.seq}, "
        f"{'in process' if args.in_process else 'one subprocess each'}")
    for mode in args.modes:
        if args.in_process:
            if not result:
                result.update(header(args))
            try:
                result.update(run_mode(mode, args))
            except Exception as err:
                traceback.print_exc()
                result[f"error_{args.shape}_{SUFFIX[mode]}"] = error_line(err)
            import torch

            free(torch.device(args.device))  # outside the except block: no traceback holds the model
        else:
            result.update(run_subprocess(args, mode))
        rosa, qlora = (result.get(f"tok_s_{args.shape}_{s}") for s in ("nf4_rosa", "nf4_qlora"))
        if rosa and qlora:
            result["rosa_over_qlora_tok_s"] = rosa / qlora
        result["modes"] = args.modes
        write(result, args.out)
    errors = {k: v for k, v in result.items() if k.startswith("error_")}
    for k, v in errors.items():
        log(f"{k}: {v}")
    log(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
