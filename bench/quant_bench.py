"""One training step over a 4-bit base on one GPU: ROSA (nf4, frozen stack) vs PEFT QLoRA (nf4).

    python3 bench/quant_bench.py --out FILE.json                     # one GPU, Llama-3-8B shape
    python3 bench/quant_bench.py --tiny --out /tmp/q.json            # CPU smoke check, tiny Llama

Why: a quantized base is where ROSA and QLoRA compete (a 4-bit Llama-3-8B fits a small GPU);
this measures what one step costs in time and memory for each, on the same NF4 base
(``rosa_scale.quant.quantize_linear``: Linear4bit, double quantization, bf16 compute).

Modes (each in a fresh subprocess, so each peak is its own; ``--in-process`` runs them in turn):

    rosa_nf4             apply_rosa(quantize="nf4"), torch AdamW on the factors
    rosa_nf4_adamw8bit   the same with bitsandbytes AdamW8bit
    qlora_nf4            the targets replaced by the same Linear4bit layers, PEFT LoRA (r, alpha 2r), AdamW
    rosa_bf16            ROSA over the plain bf16 base, for reference

All: random bf16 weights built on the device, gradient checkpointing (non-reentrant), random
token ids as inputs and labels, ``--warmup`` untimed steps then ``--steps`` timed ones. Per mode:
median step seconds, tokens/s, peak GiB of the timed steps and of warm-up + timed steps, the
model's GiB before and after quantization, and for ROSA one ``resample(model, optimizer)``
(seconds, peak GiB). Flat JSON, rewritten after every mode; a failed mode leaves its error line.
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


def parse_args(argv=None) -> argparse.Namespace:
    """Command line (plain argparse: the parent process never imports torch)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file (flat keys), rewritten after every mode")
    p.add_argument("--modes", nargs="+", default=list(MODES), help="subset of " + " ".join(MODES))
    p.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (hidden 64, 2 layers, seq 32, 2 steps)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, cpu with --tiny")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16, help="ROSA / LoRA rank")
    p.add_argument("--method", default="eigh", choices=["eigh", "svd", "qr"], help="ROSA factorizer")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true", help="all modes in this process (peaks reset between)")
    p.add_argument("--mode-timeout", type=float, default=240.0, help="seconds one mode's subprocess may take")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one mode, result JSON to --out
    args = p.parse_args(argv)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 2, 64, 128, 4, 2, 300
        args.seq, args.batch, args.steps, args.warmup = 32, 2, 2, 1
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.shape = "tiny" if args.tiny else "8b"
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


def build_model(args, dev):
    """Llama-shaped causal LM, random bf16 weights initialized on the device (fast there), train mode,
    gradient checkpointing as a QLoRA run uses it. The embedding output is made to require grad so
    backward reaches every layer whatever the checkpointing flavour."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 8192), rope_theta=500000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def setup_rosa(args, dev, quantize: str, optim: str):
    """apply_rosa on every linear layer but the LM head (quantized in place for nf4), then the optimizer."""
    import torch
    from rosa_scale import RosaConfig, adapter_parameters, apply_rosa

    model = build_model(args, dev)
    before = gib(dev)
    sync(dev)
    start = time.perf_counter()
    apply_rosa(model, RosaConfig(rank=args.rank, quantize=quantize, target_modules="all-linear", method=args.method,
                                 seed=args.seed))
    sync(dev)
    secs = time.perf_counter() - start
    free(dev)  # the replaced bf16 layers
    params = adapter_parameters(model)
    if optim == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt, {"model_gib_bf16": before, "model_gib": gib(dev), "apply_rosa_s": secs}


def setup_qlora(args, dev):
    """The same targets as ROSA's 'all-linear', each replaced by rosa_scale's own NF4 Linear4bit (so both
    bases are bit-identical), then PEFT LoRA over them (PEFT's bnb 4-bit LoRA layer), AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from rosa_scale import RosaConfig
    from rosa_scale.model import _set_submodule, find_target_modules
    from rosa_scale.quant import quantize_linear

    model = build_model(args, dev)
    before = gib(dev)
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
    secs = time.perf_counter() - start
    free(dev)
    kinds = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt, {"model_gib_bf16": before, "model_gib": gib(dev), "quantize_peft_s": secs,
                        "lora_layer_types": ",".join(kinds)}


def train_step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


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
        f"{extra['model_gib']} GiB")
    if dev.type == "cuda" and extra["model_gib_bf16"] is not None:  # the bf16 targets must be gone
        out[f"base_freed_{suffix}"] = mode == "rosa_bf16" or extra["model_gib"] < 0.5 * extra["model_gib_bf16"]

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)
    reset_peak(dev)
    losses = [float(train_step(model, opt, ids)) for _ in range(args.warmup)]
    sync(dev)
    warm_peak = gib(dev, peak=True)
    reset_peak(dev)
    times = []
    for _ in range(args.steps):
        sync(dev)
        t0 = time.perf_counter()
        loss = train_step(model, opt, ids)
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

    if mode != "qlora_nf4":
        from rosa_scale import resample

        before = gib(dev)
        reset_peak(dev)
        sync(dev)
        t0 = time.perf_counter()
        resample(model, opt)
        sync(dev)
        out[f"resample_s_{suffix}"] = time.perf_counter() - t0
        out[f"resample_peak_gib_{suffix}"] = gib(dev, peak=True)
        out[f"resample_extra_gib_{suffix}"] = None if before is None else out[f"resample_peak_gib_{suffix}"] - before
        losses.append(float(train_step(model, opt, ids)))  # a step after the resample still runs
        out[f"loss_after_resample_{suffix}"] = losses[-1]
        log(f"{mode}: resample {out[f'resample_s_{suffix}']:.2f} s")
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
        "quant": "nf4, double quant, bf16 compute",
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
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--out", out, "--device", args.device]
    for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "rank", "method",
                 "warmup", "steps", "seed"):
        argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return argv + (["--tiny"] if args.tiny else []) + ["--modes", *args.modes]


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
