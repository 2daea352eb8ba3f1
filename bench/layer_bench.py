"""Decoder layers' forward and backward: the frozen base vs ROSA variants, paired in one process.

    python3 bench/layer_bench.py --compile --out FILE.json                       # GPU, Llama-3-8B shape
    python3 bench/layer_bench.py --device cpu --tiny --rounds 2 --steps 2 --out f.json

Whole steps of separate processes move 1-2% between runs (fsdp2_bench), more than most single changes to
the adapter's step are worth. Here every mode is a model of a few layers of the same shape and seed, built and
compiled side by side, timed in alternating rounds (the order reversed every other round) so drift falls
on all of them alike; the result is each mode's median step and its paired difference from ``rosa``.
Each model has ``--depth`` decoder layers run in turn, so the host issues work ahead of the GPU as in a
whole step; each mode's host milliseconds per step are reported beside its time.
ROSA layers hold fp32 factors beside the bf16 base and compute in bf16 (``compute_dtype``, as FSDP2's
mixed precision sets it). ``--profile N`` adds each mode's kernels by name (``step_profile.py``).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_bench import TARGETS, parse_args  # noqa: E402  (also puts the repository on the path)
from rosa_scale.builtin._cache import atomic_open  # noqa: E402

MODES = ("frozen", "rosa", "rosa_ungrouped", "rosa_gemms", "rosa_forward_gemms", "rosa_unfused")


def extra_args(p) -> None:
    p.add_argument("--rounds", type=int, default=6, help="alternating timing rounds of --steps steps per mode")
    p.add_argument("--depth", type=int, default=4,
                   help="decoder layers per model, run one after another in each step: the step's fixed host "
                        "work (starting the backward, dropping gradients) is then shared as in a whole model, "
                        "so the GPU, not the host, sets the time")


def build_layers(args, dev: torch.device, mode: str):
    """A model of ``--depth`` decoder layers for ``mode``."""
    from fsdp2_bench import build_model, prepare_layers
    from rosa_scale import RosaConfig, apply_rosa, rosa_layers

    layers = args.layers
    args.layers = args.depth
    model = build_model(args, dev)
    args.layers = layers
    if mode == "frozen":
        model.requires_grad_(False)
    else:
        apply_rosa(model, RosaConfig(rank=args.rank, target_modules=TARGETS, method="qr", seed=args.seed,
                                     fused=mode != "rosa_unfused",
                                     **({"shared_inputs": []} if mode == "rosa_ungrouped" else {})))
        for layer in rosa_layers(model).values():
            layer.compute_dtype = model.dtype
            layer.backward_kernels = mode != "rosa_gemms"
            layer.forward_kernels = mode not in ("rosa_gemms", "rosa_forward_gemms")
    prepare_layers(model, args, dev)  # checkpointing, then compilation, as rosa-train does
    return model


def step_fn(model, hidden: torch.Tensor, grad: torch.Tensor):
    """One forward and backward of the model's decoder layers in turn on ``hidden`` (the first layer's
    input gets a gradient, as inside a model); factor gradients dropped after each step."""
    layers = list(model.model.layers)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    embeddings = model.model.rotary_emb(hidden, positions)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = hidden.detach().requires_grad_()
        for layer in layers:
            out = layer(out, position_embeddings=embeddings, position_ids=positions)
            out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        for p in params:
            p.grad = None
    return step


def timed_ms(step, steps: int, dev: torch.device) -> tuple[float, float]:
    """Milliseconds per step over ``steps`` steps (CUDA events on GPUs), and the host's milliseconds per step
    to issue them: near the first, the host is the limit and GPU-side changes do not show."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        host = (time.perf_counter() - begin) * 1e3 / steps
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / steps, host
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - begin) * 1e3 / steps
    return host, host


def main(argv=None) -> dict:
    args = parse_args(argv, modes=MODES, methods="", description=__doc__.splitlines()[0], extra=extra_args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("layer_bench: no CUDA device (use --device cpu)")
    if args.depth < 1:
        raise SystemExit(f"layer_bench: --depth {args.depth}: must be at least 1")
    dev = torch.device(args.device)
    # every mode's layers share one code object, compiled side by side: room for each mode's versions
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.modes))
    models = {mode: build_layers(args, dev, mode) for mode in args.modes}
    dtype = next(iter(models.values())).dtype
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.seq, args.hidden)
    hidden = torch.randn(shape, generator=generator).to(dev, dtype)
    grad = torch.randn(shape, generator=generator).to(dev, dtype)
    steps = {mode: step_fn(model, hidden, grad) for mode, model in models.items()}
    for step in steps.values():  # compilation and autotuning out of the timings
        for _ in range(args.warmup):
            step()
    times, host = {mode: [] for mode in steps}, {mode: [] for mode in steps}
    for r in range(args.rounds):
        for mode in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            ms, host_ms = timed_ms(steps[mode], args.steps, dev)
            times[mode].append(ms)
            host[mode].append(host_ms)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "seq", "batch",
                                                       "rank")},
              "compile": args.compile, "checkpointing": args.checkpointing, "rounds": args.rounds, "steps": args.steps,
              "depth": args.depth}
    for mode, values in times.items():
        result[f"{mode}_ms"], result[f"{mode}_ms_rounds"] = statistics.median(values), values
        result[f"{mode}_host_ms"] = statistics.median(host[mode])
        if mode != "rosa" and "rosa" in times:  # paired within each round: drift cancels
            result[f"{mode}_minus_rosa_ms"] = statistics.median(a - b for a, b in zip(values, times["rosa"]))
        if mode != "frozen" and "frozen" in times:
            result[f"frozen_over_{mode}"] = result["frozen_ms"] / result[f"{mode}_ms"]
    if args.profile:
        from step_profile import profile_steps

        for mode, step in steps.items():
            out, _ = profile_steps(step, args.profile, by_name=True)
            result[f"{mode}_profile"] = out
    with atomic_open(args.out) as f:  # a killed run leaves the last whole file, never half of one
        f.write(json.dumps(result, indent=1))
    print("[layer_bench] " + ", ".join(f"{m} {result[f'{m}_ms']:.3f} ms (host {result[f'{m}_host_ms']:.3f})"
                                       for m in times), flush=True)
    if dev.type == "cuda" and any(result[f"{m}_host_ms"] > 0.9 * result[f"{m}_ms"] for m in times):
        print("[layer_bench] the host issued steps nearly as slowly as the GPU ran them: raise --depth", flush=True)
    return result


if __name__ == "__main__":
    main()
