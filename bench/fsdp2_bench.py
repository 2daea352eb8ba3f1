"""FSDP2 training-step and resample benchmark: frozen base vs PEFT LoRA vs ROSA.

    torchrun --nproc_per_node N bench/fsdp2_bench.py --out FILE.json          # GPUs, Llama-3-8B shape
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/fsdp2_bench.py --device cpu --tiny --out f.json

Each mode builds a fresh model with random weights (same seed on every rank), shards it with
``fully_shard`` per decoder layer + root, and times training steps. ROSA mode also times one
full resample per factorizer. Rank 0 writes flat JSON, rewritten after every mode, so a mode
that fails leaves the earlier numbers (and its own ``<mode>_error`` traceback) behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rosa_scale without an install
from rosa_scale.cli import Parser  # noqa: E402  (bad arguments: one error line)

MODES = ("frozen", "peft_lora", "rosa", "rosa_unfused", "rosa_gemms", "rosa_forward_gemms", "rosa_replicated",
         "rosa_sharded")
# rosa-train's own path without fsdp (one process, or DDP's replicas without their all-reduce): not in the defaults
LOCAL_MODES = ("frozen_local", "rosa_local", "rosa_local_unfused")
# asked for by name too: ROSA without RosaConfig.shared_inputs (each of q, k, v, gate, up reading its input alone)
UNGROUPED_MODES = ("rosa_ungrouped", "rosa_local_ungrouped")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def parse_args(argv=None, *, modes=MODES, methods="eigh,qr,svd", description=None, extra=None) -> argparse.Namespace:
    """Command line; ``--tiny`` shrinks the model (and seq) for a CPU smoke check.

    Other benchmarks reuse it with their own ``modes``, default ``methods`` and ``extra(parser)`` arguments.
    """
    p = Parser(description=description or __doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    known = modes + LOCAL_MODES + UNGROUPED_MODES if modes is MODES else modes
    p.add_argument("--modes", default=",".join(modes), help="comma-separated subset of " + ",".join(known))
    p.add_argument("--methods", default=methods, help="factorizers to time in rosa mode (slowest last)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="small model and seq 64 (CPU smoke check)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2, help="micro-batch per GPU")
    p.add_argument("--rank", type=int, default=16, help="LoRA / ROSA rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gc-every", type=int, default=0,
                   help="automatic garbage collection off; a young-generation collection every N timed steps (0: Python's own)")
    p.add_argument("--meta-init", action="store_true",
                   help="rosa mode: build on the meta device, shard, then draw each rank's shards on its GPU "
                        "(a model larger than one GPU: never whole anywhere)")
    p.add_argument("--shape", choices=["8b", "70b"], default="8b", help="Llama-3 8B or 70B shape")
    p.add_argument("--run-steps", type=int, default=0,
                   help="rosa mode, after the timings: this many steps with rosa-train's resample schedule, each "
                        "step timed (resamples included): the overhead and the longest step")
    p.add_argument("--resample-every", type=int, default=200, help="the schedule of --run-steps")
    p.add_argument("--stagger", type=int, default=1, help="spread each resample of --run-steps over N steps")
    p.add_argument("--run-method", default="qr", help="factorizer of --run-steps' resamples")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer before sharding (rosa-train's default on GPUs)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of each decoder layer")
    p.add_argument("--attn", default="sdpa", help="attention implementation (rosa-train's attn_implementation)")
    p.add_argument("--docs-per-block", type=int, default=1,
                   help="N documents per sequence, kept apart by restarting position ids (packing: documents)")
    p.add_argument("--profile", type=int, default=0,
                   help="after timing, profile N steps of each mode: GPU kernel ms by kind (bench/step_profile.py), "
                        "key-averages table in <out>-<mode>-profile.txt")
    p.add_argument("--adamw", choices=["fused", "foreach"], default="foreach",
                   help="torch AdamW's implementation for PEFT LoRA (ROSA modes use rosa-train's: foreach over "
                        "sharded factors, fused over whole ones on CUDA); fused is transformers Trainer's default")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="the LM head and loss this many tokens at a time (rosa-train's loss_chunk_tokens); 0: whole")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.shape == "70b":
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 80, 8192, 28672, 64, 8
    if args.tiny:
        args.layers = min(args.layers, 2)
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 128, 256, 4, 2, 512
        args.seq = min(args.seq, 64)
    args.modes = [m for m in args.modes.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.modes if m not in known]
    if bad:
        p.error(f"unknown mode {bad[0]!r}; choose from {', '.join(known)}")
    if args.meta_init and args.modes != ["rosa"]:
        p.error("--meta-init builds the rosa mode only: add --modes rosa")
    if args.gc_every < 0:
        p.error(f"--gc-every {args.gc_every}: must be 0 (off) or a number of steps")
    return args


def init_distributed(device: str) -> torch.device:
    """Join the torchrun group (nccl on GPUs, gloo on CPU); returns this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def all_max(values: list, dev: torch.device) -> list:
    """Element-wise max over ranks (the slowest rank, the fullest GPU); None stays None."""
    t = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [None if v != v else v for v in t.tolist()]


def gib_allocated(dev: torch.device, peak: bool = False):
    """Allocated (or peak allocated) GiB on this GPU; None on CPU."""
    if dev.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(dev) if peak else torch.cuda.memory_allocated(dev)) / GIB


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def build_model(args, dev: torch.device):
    """Llama-shaped causal LM with random weights, built whole on this rank's device, fixed seed."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 8192), rope_theta=500000.0, tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    if getattr(args, "meta_init", False):  # parameters on meta, buffers (rotary frequencies) computed
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
        model.config.use_cache = False
        return model
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
    model.config.use_cache = False
    return model


def mp_policy(dev: torch.device):
    """bf16 compute / fp32 gradient reduction on GPUs; plain fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dev.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def prepare_layers(model: torch.nn.Module, args, dev: torch.device) -> None:
    """What rosa-train does to the decoder layers before sharding: checkpointing, then compilation."""
    from rosa_scale.compiled_layers import compile_decoder_layers
    from rosa_scale.run_model import enable_checkpointing

    if args.checkpointing:
        enable_checkpointing(model)
    if args.compile:
        compile_decoder_layers(model, dev)


def shard_layers(model: torch.nn.Module, dev: torch.device, args) -> None:
    """``fully_shard`` every decoder layer, then ``model`` as the root (what shard_model does)."""
    from torch.distributed.fsdp import fully_shard

    prepare_layers(model, args, dev)
    policy = mp_policy(dev)
    for module in list(model.modules()):
        if type(module).__name__ == "LlamaDecoderLayer":
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def make_batch(args, dev: torch.device) -> torch.Tensor:
    """Random token ids (different per rank), used as inputs and labels."""
    g = torch.Generator().manual_seed(args.seed + 1000 + dist.get_rank())
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)


def document_positions(args, dev: torch.device) -> torch.Tensor | None:
    """Position ids of ``--docs-per-block`` equal documents packed in each sequence (restarting at
    each, as rosa-train's ``packing: documents`` gives them), or None for one document per sequence."""
    k = getattr(args, "docs_per_block", 1)
    if k <= 1:
        return None
    return (torch.arange(args.seq) % -(-args.seq // k)).expand(args.batch, -1).to(dev)


AFTER_BACKWARD = weakref.WeakKeyDictionary()  # model -> what rosa-train calls between backward and step


def train_step(model, opt, ids: torch.Tensor, chunk: int = 0, positions: torch.Tensor | None = None,
               marks: list | None = None) -> None:
    """Forward with labels (or the chunked loss), backward, optimizer step (if any). With ``marks``, the host
    clock at the start and after forward, backward and step is appended (nothing waits for the GPU)."""
    start = time.perf_counter()
    if chunk:
        from rosa_scale.chunked_loss import loss_inside_forward

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        loss = loss_inside_forward(model, inner, ids, chunk_tokens=chunk, position_ids=positions)
    else:
        loss = model(input_ids=ids, labels=ids, position_ids=positions, use_cache=False).loss
    forward = time.perf_counter()
    loss.backward()
    if model in AFTER_BACKWARD:  # ROSA: the gradient averaging rosa-train asks of its engine
        AFTER_BACKWARD[model](model)
    backward = time.perf_counter()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if marks is not None:
        marks.append((start, forward, backward, time.perf_counter()))


def host_phases(marks: list, steps: int) -> dict:
    """Median host milliseconds of forward, backward and optimizer step over the last ``steps`` marks: what
    the host spends issuing each phase. A phase's host time near the step's time means the GPU waits on it."""
    last = marks[-steps:]
    med = lambda i: statistics.median(m[i + 1] - m[i] for m in last) * 1e3  # noqa: E731
    return {"host_ms_forward": med(0), "host_ms_backward": med(1), "host_ms_step": med(2),
            "host_ms_total": statistics.median(m[3] - m[0] for m in last) * 1e3}


def fixed_collections(every: int):
    """With ``every`` (``--gc-every``): automatic collection off now, and a function to call after each
    timed step (1-based) that collects the young generations every ``every`` steps, inside the step, at
    the same steps on every rank (a pause on one rank otherwise lands in a different step on each);
    ``collect(None)`` turns automatic collection back on. Without: a function that does nothing."""
    if not every:
        return lambda step: None
    gc.collect()
    gc.disable()

    def collect(step):
        if step is None:
            gc.enable()
        elif step % every == 0:
            gc.collect(1)
    return collect


def time_steps(model, opt, args, dev: torch.device, step=train_step) -> dict:
    """Median step time over ``args.steps`` after ``args.warmup``; tokens/s per GPU and peak GiB.

    ``step(model, opt, ids)`` is one training step (``train_step`` here; DeepSpeed passes its own)."""
    ids = make_batch(args, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    collect = fixed_collections(args.gc_every)
    for i in range(args.warmup + args.steps):
        sync(dev)
        start = time.perf_counter()
        step(model, opt, ids)
        collect(i + 1)
        sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    collect(None)
    times = all_max(times, dev)
    peak = all_max([gib_allocated(dev, peak=True)], dev)[0]
    step = statistics.median(times)
    return {"tok_s_per_gpu": args.batch * args.seq / step, "step_s": step, "peak_gib": peak,
            "step_s_each": [round(t, 4) for t in times]}  # to tell a slow machine from one slow step


def frozen_model(args, dev: torch.device):
    """Base model only, every weight frozen. Backward still runs through every layer because a
    forward hook on the input embedding marks its output ``requires_grad`` (what HF's
    ``enable_input_require_grads`` does): activation gradients flow, no weight gets one."""
    model = build_model(args, dev)
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    return model


def setup_frozen(args, dev: torch.device) -> tuple:
    """The frozen base (``frozen_model``) sharded as the ROSA modes are."""
    model = frozen_model(args, dev)
    shard_layers(model, dev, args)
    return model, None, {}


def autocast_forward(model, dev: torch.device):
    """The forward under bf16 autocast on GPUs, as accelerate's ``mixed_precision: bf16`` runs a model it
    prepares (rosa-train's one-process and DDP paths); unchanged on CPU."""
    if dev.type == "cuda":
        model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(model.forward)
    return model


def setup_frozen_local(args, dev: torch.device) -> tuple:
    """The frozen base as rosa-train's local path runs it: whole on the GPU, layers compiled, autocast."""
    model = frozen_model(args, dev)
    prepare_layers(model, args, dev)
    return autocast_forward(model, dev), None, {}


def setup_rosa_local(args, dev: torch.device, fused: bool = True, shared: bool = True) -> tuple:
    """ROSA as rosa-train's local path runs it (no fsdp): applied and split whole, layers compiled, fp32
    factors, forward under autocast, rosa-train's AdamW. ``fused=False``: mode rosa_local_unfused;
    ``shared=False``: mode rosa_local_ungrouped."""
    from rosa_scale import adapter_parameters, apply_rosa
    from rosa_scale.optimizers import build_optimizer

    model = build_model(args, dev)
    apply_rosa(model, rosa_config(args, fused, shared))
    prepare_layers(model, args, dev)
    opt = build_optimizer("adamw", adapter_parameters(model), lr=1e-4, weight_decay=0.01)
    return autocast_forward(model, dev), opt, {}


def adamw(params: list, args, dev: torch.device) -> torch.optim.Optimizer:
    """AdamW at lr 1e-4, fused on CUDA with ``--adamw fused``."""
    return torch.optim.AdamW(params, lr=1e-4, fused=(args.adamw == "fused" and dev.type == "cuda") or None)


def setup_peft_lora(args, dev: torch.device) -> tuple:
    """PEFT LoRA on the seven projections (fp32 adapters: PEFT's default upcast), AdamW."""
    from peft import LoraConfig, get_peft_model

    base = build_model(args, dev)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(base, lora)
    shard_layers(model.get_base_model(), dev, args)
    opt = adamw([p for p in model.parameters() if p.requires_grad], args, dev)
    return model, opt, {}


def rosa_config(args, fused: bool, shared: bool):
    from rosa_scale import RosaConfig

    return RosaConfig(rank=args.rank, target_modules=TARGETS, method="eigh", seed=args.seed, fused=fused,
                      **({} if shared else {"shared_inputs": []}))


def setup_rosa(args, dev: torch.device, fused: bool = True, factors: str = "auto", kernels: bool = True,
               shared: bool = True, forward_kernels: bool = True) -> tuple:
    """ROSA on the seven projections through the rosa_scale API: wrap, shard, first split, rosa-train's
    AdamW. ``fused=False``: each layer's base and factors as separate operations (mode rosa_unfused);
    ``kernels=False``: the fused node in cuBLAS GEMMs only, no rosa_scale/thin_forward.py or thin_grads.py (mode
    rosa_gemms); ``forward_kernels=False``: the forward's output terms as GEMMs (mode rosa_forward_gemms);
    ``shared=False``: no layers sharing their input's products (mode rosa_ungrouped);
    ``factors``: rosa-train's ``fsdp_factors`` (auto, as rosa-train decides it; modes rosa_replicated and
    rosa_sharded force one)."""
    from rosa_scale import adapter_parameters, apply_rosa, resample, rosa_layers
    from rosa_scale.config import TrainConfig, factors_replicated
    from rosa_scale.engines import engine_for
    from rosa_scale.engines.fsdp2 import shard_model
    from rosa_scale.optimizers import build_optimizer

    model = build_model(args, dev)
    apply_rosa(model, rosa_config(args, fused, shared), split=False)
    for layer in rosa_layers(model).values():
        layer.forward_kernels, layer.backward_kernels = kernels and forward_kernels, kernels
    policy = mp_policy(dev)
    prepare_layers(model, args, dev)
    numbers = sum(p.numel() for p in adapter_parameters(model))
    replicate_factors = factors_replicated(TrainConfig(fsdp=True, fsdp_factors=factors), numbers)
    shard_model(model, param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                replicate_factors=replicate_factors)
    if args.meta_init:
        draw_shards(model, dev, args.seed)
    sync(dev)
    start = time.perf_counter()
    resample(model, index=0)
    sync(dev)
    first = all_max([time.perf_counter() - start], dev)[0]
    opt = build_optimizer("adamw", adapter_parameters(model), lr=1e-4, weight_decay=0.01)
    AFTER_BACKWARD[model] = engine_for(model).sync_gradients  # whole factors: their all-reduce
    config = {f"rosa_config_{k}": ",".join(map(str, v)) if isinstance(v, list) else v  # flat keys: strings
              for k, v in dataclasses.asdict(model.rosa_state.config).items()}
    return model, opt, {"rosa_first_split_s_eigh": first, "host_rss_gib_after_split": all_max([host_rss_gib()], dev)[0],
                        **config}


@torch.no_grad()
def draw_shards(model, dev: torch.device, seed: int) -> None:
    """Give a meta-built, sharded model memory for its own shards only and random weights (N(0, 0.02);
    norms 1; ROSA factors 0 until the first split), drawn shard by shard on this rank's device."""
    from torch.distributed.tensor import DTensor

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=dev)
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    gen = torch.Generator(dev).manual_seed(seed + dist.get_rank())
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if name.endswith((".up", ".down")):
            local.zero_()
        elif "norm" in name:
            local.fill_(1.0)
        else:
            local.normal_(0.0, 0.02, generator=gen)


def host_rss_gib() -> float:
    """Peak resident memory of this process (Linux ru_maxrss), GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def warm_factorizer(method: str, dev: torch.device) -> None:
    """Load the factorizer's kernels (cuSOLVER handles etc.) on a small matrix, outside the timing."""
    from rosa_scale import split

    split(torch.randn(256, 512, device=dev), 8, method=method, generator=torch.Generator().manual_seed(0))
    sync(dev)


def time_resample(model, opt, method: str, dev: torch.device) -> dict:
    """One full resample with ``method``: synced seconds and peak extra GiB, max over ranks."""
    from rosa_scale import resample

    warm_factorizer(method, dev)
    model.rosa_state.config.method = method
    dist.barrier()
    before = gib_allocated(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    start = time.perf_counter()
    reported = resample(model, opt)
    sync(dev)
    secs = time.perf_counter() - start
    extra = None if before is None else gib_allocated(dev, peak=True) - before
    secs, reported, extra = all_max([secs, reported, extra], dev)
    log(f"resample {method}: {secs:.2f} s (resample() says {reported:.2f} s), extra {fmt(extra)} GiB")
    return {f"resample_s_{method}": secs, f"resample_reported_s_{method}": reported,
            f"resample_extra_gib_{method}": extra}


def run_mode(mode: str, args, dev: torch.device, result: dict) -> None:
    """Fresh model for ``mode``: timed steps (then resamples, for rosa) into ``result``, saved as they come."""
    setup = {"frozen": setup_frozen, "peft_lora": setup_peft_lora, "rosa": setup_rosa,
             "rosa_unfused": lambda a, d: setup_rosa(a, d, fused=False),
             "rosa_gemms": lambda a, d: setup_rosa(a, d, kernels=False),
             "rosa_forward_gemms": lambda a, d: setup_rosa(a, d, forward_kernels=False),
             "rosa_replicated": lambda a, d: setup_rosa(a, d, factors="replicated"),
             "rosa_sharded": lambda a, d: setup_rosa(a, d, factors="sharded"),
             "frozen_local": setup_frozen_local, "rosa_local": setup_rosa_local,
             "rosa_local_unfused": lambda a, d: setup_rosa_local(a, d, fused=False),
             "rosa_ungrouped": lambda a, d: setup_rosa(a, d, shared=False),
             "rosa_local_ungrouped": lambda a, d: setup_rosa_local(a, d, shared=False)}[mode]
    model, opt, extra = setup(args, dev)
    result.update(extra)
    result[f"{mode}_trainable_params_local"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if mode.startswith("rosa"):
        from rosa_scale.engines.fsdp2 import replicated_factors

        result[f"{mode}_replicated_factors"] = bool(replicated_factors(model))
    positions, marks = document_positions(args, dev), []
    stats = time_steps(model, opt, args, dev,
                       step=lambda m, o, ids: train_step(m, o, ids, args.loss_chunk, positions, marks))
    stats.update(host_phases(marks, args.steps))
    result.update({f"{mode}_{k}": v for k, v in stats.items()})
    log(f"{mode}: {stats['tok_s_per_gpu']:.0f} tok/s per GPU, step {stats['step_s'] * 1e3:.1f} ms, "
        f"peak {fmt(stats['peak_gib'])} GiB; host ms forward {stats['host_ms_forward']:.1f}, backward "
        f"{stats['host_ms_backward']:.1f}, step {stats['host_ms_step']:.1f}")
    if args.profile:
        from step_profile import profile_steps

        ids = make_batch(args, dev)
        kernels, table = profile_steps(lambda: train_step(model, opt, ids, args.loss_chunk, positions), args.profile)
        result.update({f"{mode}_{k}": v for k, v in kernels.items()})
        if dist.get_rank() == 0:
            Path(args.out).with_name(Path(args.out).stem + f"-{mode}-profile.txt").write_text(table)
        log(f"{mode}: kernels {kernels['kernel_ms_per_step']:.1f} ms per step over a span of {kernels['span_ms_per_step']:.1f}")
    write(result, args.out)
    if mode == "rosa" and args.methods:
        from rosa_scale import resample

        model.rosa_state.config.method = args.methods[0]
        resample(model, opt)  # warm-up, with the first method timed
        sync(dev)
        for method in args.methods:
            result.update(time_resample(model, opt, method, dev))
            extras = [result[f"resample_extra_gib_{m}"] for m in args.methods if f"resample_extra_gib_{m}" in result]
            result["resample_extra_gib"] = None if None in extras else max(extras)
            write(result, args.out)
    if mode == "rosa" and args.run_steps:
        result.update(run_with_resamples(model, opt, args, dev))
        write(result, args.out)


def run_with_resamples(model, opt, args, dev: torch.device) -> dict:
    """``args.run_steps`` steps, resampling as rosa-train does (every ``args.resample_every`` steps, spread
    over ``args.stagger``); each step's seconds include its resample part. Overhead: resample seconds
    over the seconds of the plain steps; the longest step against the median."""
    from rosa_scale import resample
    from rosa_scale.schedule import resample_part

    model.rosa_state.config.method = args.run_method
    ids = make_batch(args, dev)
    times, resampling = [], []
    collect = fixed_collections(args.gc_every)
    for step in range(1, args.run_steps + 1):
        sync(dev)
        start = time.perf_counter()
        train_step(model, opt, ids, args.loss_chunk)
        part = resample_part(step, args.resample_every, args.stagger, args.run_steps + 1)
        if part is not None:
            resample(model, opt, part=(part, args.stagger) if args.stagger > 1 else None)
        collect(step)
        sync(dev)
        times.append(time.perf_counter() - start)
        if part is not None:
            resampling.append(step)
    collect(None)
    times = all_max(times, dev)
    plain = [t for i, t in enumerate(times, 1) if i not in resampling]
    median = statistics.median(plain)
    extra = sum(times[i - 1] - median for i in resampling)
    log(f"run of {args.run_steps} steps, resample every {args.resample_every} over {args.stagger} ({args.run_method}): "
        f"median {median * 1e3:.1f} ms, longest {max(times) / median:.2f}x, overhead {extra / sum(plain):.2%}")
    return {"run_step_s_each": [round(t, 4) for t in times], "run_resample_steps": resampling,
            "run_median_step_s": median, "run_max_step_over_median": max(times) / median,
            "run_resample_overhead_frac": extra / sum(plain), "run_resample_every": args.resample_every,
            "run_stagger": args.stagger, "run_method": args.run_method, "run_gc_every": args.gc_every}


def free_memory(dev: torch.device) -> None:
    """Between modes: the last mode's memory back, and its compiled code dropped (every decoder layer shares
    one code object, whose cache holds 8 versions: modes run after others would otherwise run uncompiled)."""
    torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()


LOG_NAME = "fsdp2_bench"  # a benchmark importing these helpers sets its own


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{LOG_NAME}] {msg}", flush=True)


def source_id() -> dict:
    """Which rosa_scale code ran: git HEAD (if any) and a hash of rosa_scale/**/*.py as it was."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "rosa_scale").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
        changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "rosa_scale", "bench"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        if head and changed:  # a copied tree whose .git is older than its files: HEAD alone would mislead
            head += "+changes"
    except (OSError, subprocess.SubprocessError):
        head = None
    return {"git_head": head, "rosa_scale_src_sha256": digest.hexdigest()[:16]}


def header(args, dev: torch.device) -> dict:
    """What was run where."""
    import transformers

    return {
        "gpus": dist.get_world_size(), "device": dev.type, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "seq": args.seq, "batch_per_gpu": args.batch, "rank": args.rank, "layers": args.layers,
        "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
        "kv_heads": args.kv_heads, "vocab": args.vocab, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "gc_every": args.gc_every, "adamw": args.adamw, "shape": args.shape, "meta_init": args.meta_init, "compile": args.compile, "checkpointing": args.checkpointing,
        "loss_chunk": args.loss_chunk, "docs_per_block": args.docs_per_block,
        "attn": args.attn, "param_dtype": "bfloat16" if dev.type == "cuda" else "float32",
        "reduce_dtype": "float32" if dev.type == "cuda" else None, **source_id(),
    }


def write(result: dict, path: str) -> None:
    """Rank 0 writes the JSON atomically (rewritten after every figure)."""
    if dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = init_distributed(args.device)
    result = header(args, dev)
    log(f"{result['gpus']} x {result['gpu_name']}, torch {torch.__version__}, modes {args.modes}, "
        f"{args.layers} layers, seq {args.seq}, batch {args.batch}")
    failed = False
    for mode in args.modes:
        try:
            run_mode(mode, args, dev, result)
        except Exception as err:  # keep the other modes' numbers; the traceback goes in the JSON
            failed = True
            result[f"{mode}_error"] = "".join(traceback.format_exception(err))
            print(f"[fsdp2_bench rank {dist.get_rank()}] {mode} failed:\n{result[f'{mode}_error']}", flush=True)
        free_memory(dev)  # outside the except block, so no traceback holds the model
        result[f"{mode}_leftover_gib"] = all_max([gib_allocated(dev)], dev)[0]
        write(result, args.out)
    log(f"wrote {args.out}")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
