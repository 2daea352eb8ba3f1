"""DeepSpeed ZeRO-3 training-step and resample benchmark: PEFT LoRA vs ROSA (and ROSA with CPU offload).

    torchrun --nproc_per_node N bench/zero3_bench.py --out FILE.json          # GPUs, Llama-3-8B shape
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/zero3_bench.py \\
        --device cpu --tiny --out f.json                                    # CPU smoke check (gloo)

The counterpart of ``bench/fsdp2_bench.py`` (whose helpers it imports): each mode builds the same
random-weight model whole on every rank (fixed seed), wraps it (PEFT LoRA or ``apply_rosa(split=False)``),
hands it to ``deepspeed.initialize`` with a torch AdamW over the adapters (DeepSpeed partitions it there),
and times training steps. ROSA modes make the first split on the partitioned weights and time full
resamples. Besides speed and memory it records why ZeRO-3 costs what it costs: modules and DeepSpeed
hooks on the model, module calls per forward (each one a DeepSpeed pre/post hook pair), parameters kept
whole by ``stage3_param_persistence_threshold`` (``p.ds_persist``), and all-gathers issued per step.
Rank 0 writes flat JSON (``--append`` merges into an existing file), rewritten after every figure.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import fsdp2_bench as fb  # noqa: E402
from bench.fsdp2_bench import (  # noqa: E402
    GIB, TARGETS, all_max, build_model, fmt, gib_allocated, header, log, make_batch, sync, time_resample,
    time_steps, write,
)

fb.LOG_NAME = "zero3_bench"
MODES = ("peft_lora_zero3", "rosa_zero3", "rosa_zero3_offload", "frozen_zero3")
DEFAULT_MODES = ("peft_lora_zero3", "rosa_zero3", "rosa_zero3_offload")
CONFIGS = {False: REPO / "configs/deepspeed/zero3.json", True: REPO / "configs/deepspeed/zero3_offload.json"}


def extra_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload-warmup", type=int, default=2)
    p.add_argument("--offload-steps", type=int, default=3, help="timed steps in rosa_zero3_offload (slow)")
    p.add_argument("--offload-methods", default="eigh", help="factorizers to time in rosa_zero3_offload")
    p.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 on CPU too (always on with --device cuda)")
    p.add_argument("--append", action="store_true", help="merge into --out if it exists (one mode per process)")
    p.add_argument("--persistence-threshold", type=float, default=None,
                   help="override stage3_param_persistence_threshold of the config (default: the config's 1e7)")
    p.add_argument("--leaf-modules", default="",
                   help="comma-separated class names made ZeRO-3 leaf modules (zero_optimization.leaf_module): "
                        "hooks and fetches per such module, none inside (e.g. LlamaDecoderLayer); not used on 2026-11-28")
    p.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE", type=_zero_setting,
                   help="set zero_optimization.KEY to VALUE (JSON) in the config, e.g. stage3_prefetch_bucket_size=1e9; "
                        "repeatable")
    p.add_argument("--watchdog", type=float, default=0, help="seconds per phase before rank 0 saves and exits (0: off)")


def _zero_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--ds-set``, the value read as JSON (numbers such as 1e9 included)."""
    key, sep, value = text.partition("=")
    try:
        if not (sep and key):
            raise ValueError("expected KEY=VALUE")
        return key, json.loads(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = fb.parse_args(argv, modes=MODES, methods="eigh,qr", description=__doc__.splitlines()[0], extra=extra_args)
    if not any(a == "--modes" or a.startswith("--modes=") for a in argv):
        args.modes = list(DEFAULT_MODES)  # everything but the optional frozen baseline
    args.offload_methods = [m for m in args.offload_methods.split(",") if m]
    return args


def init_distributed(device: str) -> torch.device:
    """torchrun's group (nccl / gloo, as fsdp2_bench) handed to DeepSpeed's comm layer."""
    import deepspeed

    dev = fb.init_distributed(device)
    deepspeed.init_distributed("nccl" if device == "cuda" else "gloo")
    return dev


def ds_config(args, dev: torch.device, offload: bool) -> dict:
    """configs/deepspeed/zero3{,_offload}.json with the "auto" values filled in for this run."""
    cfg = json.loads(CONFIGS[offload].read_text())
    cfg["train_micro_batch_size_per_gpu"] = args.batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = args.batch * dist.get_world_size()
    cfg["bf16"] = {"enabled": dev.type == "cuda" or args.bf16}
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    cfg["wall_clock_breakdown"] = False
    if args.leaf_modules:
        cfg["zero_optimization"]["leaf_module"] = {"classes": [c for c in args.leaf_modules.split(",") if c]}
    if args.persistence_threshold is not None:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    cfg["zero_optimization"].update(args.ds_set)
    return cfg


class Watchdog:
    """Rank-local timer: if a phase outlives ``seconds``, rank 0 saves ``result`` with the phase named
    as this mode's error, and every rank exits at once (a hung collective cannot be caught)."""

    def __init__(self, seconds: float, result: dict, args, mode: str):
        self.seconds, self.result, self.args, self.mode = seconds, result, args, mode
        self.timer = None

    def arm(self, phase: str) -> None:
        self.disarm()
        if self.seconds > 0:
            self.timer = threading.Timer(self.seconds, self._fire, args=(phase,))
            self.timer.daemon = True
            self.timer.start()

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self, phase: str) -> None:
        if dist.get_rank() == 0:
            self.result[f"{self.mode}_error"] = f"watchdog: {phase} took over {self.seconds:.0f} s; process exited"
            write(self.result, self.args.out)
        print(f"[zero3_bench rank {dist.get_rank()}] watchdog: {phase} over {self.seconds:.0f} s, exiting", flush=True)
        os._exit(124)


def ds_step(engine, opt, ids: torch.Tensor) -> None:
    """One DeepSpeed training step: forward with labels, engine.backward, engine.step."""
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


class CommCounter:
    """Counts DeepSpeed's all-gathers (calls and bytes gathered) while active: the fetch granularity."""

    NAMES = ("allgather_fn", "all_gather_into_tensor", "all_gather", "all_gather_coalesced")

    def __init__(self):
        import deepspeed.comm as dscomm

        self.mod, self.saved = dscomm, {}
        self.calls, self.bytes = 0, 0

    def _wrap(self, fn):
        def counted(*a, **k):
            self.calls += 1
            out = a[0] if a else k.get("output_tensor", k.get("tensor_list"))
            tensors = out if isinstance(out, (list, tuple)) else [out]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
            return fn(*a, **k)
        return counted

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(self.mod, name):
                self.saved[name] = getattr(self.mod, name)
                setattr(self.mod, name, self._wrap(self.saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.mod, name, fn)


def structure(model: torch.nn.Module, prefix: str) -> dict:
    """Modules, DeepSpeed's hooks, and what the persistence threshold keeps whole, on the partitioned model."""
    modules = list(model.modules())
    params = list(model.parameters())
    persist = [p for p in params if getattr(p, "ds_persist", False)]
    trainable = [p for p in params if p.requires_grad]
    numel = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731
    out = {
        "modules": len(modules),
        "forward_pre_hooks": sum(len(m._forward_pre_hooks) for m in modules),
        "forward_hooks": sum(len(m._forward_hooks) for m in modules),
        "params": len(params),
        "params_trainable": len(trainable),
        "params_trainable_numel": numel(trainable),
        "params_persisted": len(persist),
        "params_persisted_numel": numel(persist),
        "params_persisted_trainable": sum(p.requires_grad for p in persist),
        "params_persisted_frozen": sum(not p.requires_grad for p in persist),
        "params_gathered": len(params) - len(persist),  # partitioned: fetched by an all-gather when used
        "adapter_dtype_in_forward": str(trainable[0].dtype).replace("torch.", "") if trainable else None,
    }
    return {f"{prefix}_{k}": v for k, v in out.items()}


def fp32_master_dtype(opt) -> str | None:
    """dtype of DeepSpeed's flat optimizer partitions (the master copy the optimizer updates)."""
    flats = getattr(opt, "fp32_partitioned_groups_flat", None)
    return str(flats[0].dtype).replace("torch.", "") if flats else None


def count_step(engine, opt, args, dev: torch.device) -> dict:
    """One untimed step with counters: module calls per forward, all-gathers (calls, GiB) per step."""
    calls = [0]

    def pre(module, inputs):
        calls[0] += 1

    ids = make_batch(args, dev)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    try:
        with CommCounter() as fwd_bwd:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            sync(dev)
    finally:
        handle.remove()
    with CommCounter() as step:  # after the update DeepSpeed re-gathers the persisted trainable params
        engine.step()
        sync(dev)
    return {"module_calls_per_forward": calls[0], "allgathers_per_step": fwd_bwd.calls + step.calls,
            "allgather_gib_per_step": (fwd_bwd.bytes + step.bytes) / GIB,
            "allgathers_fwd_bwd": fwd_bwd.calls, "allgathers_optimizer_step": step.calls,
            "allgather_gib_optimizer_step": step.bytes / GIB}


def count_trace_invalidations(opt) -> dict:
    """A counter of DeepSpeed dropping its recorded module order. Prefetching runs only on a complete
    trace; a model whose module order changes between steps loses it, and DeepSpeed says so only with
    ``log_trace_cache_warnings``. Any count above 0 over the timed steps means fetches were not overlapped."""
    coordinator = opt.parameter_offload.get_param_coordinator()
    counter, invalidate = {"n": 0}, coordinator._invalidate_trace

    def counted():
        counter["n"] += 1
        return invalidate()

    coordinator._invalidate_trace = counted
    return counter


def build(mode: str, args, dev: torch.device):
    """The wrapped model (not yet partitioned) and the trainable parameters, for ``mode``."""
    model = build_model(args, dev)
    if args.leaf_modules or dict(args.ds_set).get("stage3_module_granularity_threshold"):
        # a leaf layer (named, or chosen by DeepSpeed) re-fetches its params in backward only if its input requires grad
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    if mode == "frozen_zero3":  # activation grads still flow (as fsdp2_bench's frozen mode); one tiny
        model.requires_grad_(False)  # trainable param so DeepSpeed has an optimizer to build
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        head = model.get_output_embeddings()
        head.bias_probe = torch.nn.Parameter(torch.zeros(1, device=dev, dtype=head.weight.dtype))
        return model, [head.bias_probe]
    if mode == "peft_lora_zero3":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, lora)  # fp32 adapters (PEFT's autocast_adapter_dtype upcast)
        return model, [p for p in model.parameters() if p.requires_grad]
    from rosa_scale import RosaConfig, adapter_parameters, apply_rosa

    apply_rosa(model, RosaConfig(rank=args.rank, target_modules=TARGETS, method="eigh", seed=args.seed), split=False)
    return model, adapter_parameters(model)


def run_mode(mode: str, args, dev: torch.device, result: dict, dog: Watchdog) -> None:
    import deepspeed

    offload = mode.endswith("_offload")
    rosa = mode.startswith("rosa")
    dog.arm(f"{mode} setup")
    model, params = build(mode, args, dev)
    result[f"{mode}_adapter_dtype_built"] = str(params[0].dtype).replace("torch.", "")
    result[f"{mode}_modules_before_init"] = len(list(model.modules()))
    cfg = ds_config(args, dev, offload)
    result[f"{mode}_ds_zero_optimization"] = json.dumps(cfg["zero_optimization"], sort_keys=True)
    result[f"{mode}_ds_bf16"] = cfg["bf16"]["enabled"]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sync(dev)
    start = time.perf_counter()
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    sync(dev)
    result[f"{mode}_ds_initialize_s"] = all_max([time.perf_counter() - start], dev)[0]
    module = engine.module
    result.update(structure(module, mode))
    result[f"{mode}_master_dtype"] = fp32_master_dtype(opt)
    result[f"{mode}_communication_dtype"] = str(engine.communication_data_type).replace("torch.", "")
    result["reduce_dtype"] = result[f"{mode}_communication_dtype"]  # gradients are reduce-scattered in this dtype
    result[f"{mode}_gib_after_init"] = all_max([gib_allocated(dev)], dev)[0]
    write(result, args.out)
    log(f"{mode}: {result[f'{mode}_modules']} modules, {result[f'{mode}_forward_pre_hooks']} + "
        f"{result[f'{mode}_forward_hooks']} forward (pre + post) hooks, {result[f'{mode}_params_persisted']} of "
        f"{result[f'{mode}_params']} params persisted, adapters {result[f'{mode}_adapter_dtype_built']} -> "
        f"{result[f'{mode}_adapter_dtype_in_forward']} (master {result[f'{mode}_master_dtype']})")

    # ZeRO-3 with CPU offload keeps the partitions (p.ds_tensor) on the CPU; rosa_scale's Zero3Engine
    # broadcasts a tensor on p.ds_tensor.device from non-owners but a GPU tensor from the owner. Split
    # after the timed steps there (zero factors cost the same per step), so the steps are measured anyway.
    split_first = rosa and not offload
    if split_first:
        result.update(first_split(module, opt, mode, dev, dog))
    dog.arm(f"{mode} steps")
    step_args = copy.copy(args)
    if offload:
        step_args.warmup, step_args.steps = args.offload_warmup, args.offload_steps
    invalidations = count_trace_invalidations(opt)
    stats = time_steps(engine, opt, step_args, dev, step=ds_step)
    result.update({f"{mode}_{k}": v for k, v in stats.items()})
    result[f"{mode}_trace_invalidations"] = invalidations["n"]
    result[f"{mode}_timed_steps"], result[f"{mode}_warmup_steps"] = step_args.steps, step_args.warmup
    log(f"{mode}: {stats['tok_s_per_gpu']:.0f} tok/s per GPU, step {stats['step_s'] * 1e3:.1f} ms, "
        f"peak {fmt(stats['peak_gib'])} GiB, module trace dropped {invalidations['n']} times")
    write(result, args.out)
    if not offload:  # one more (untimed, steady-state) step with counters; offload steps are too slow
        result.update({f"{mode}_{k}": v for k, v in count_step(engine, opt, step_args, dev).items()})
        log(f"{mode}: {result[f'{mode}_module_calls_per_forward']} module calls per forward, "
            f"{result[f'{mode}_allgathers_per_step']} all-gathers per step "
            f"({result[f'{mode}_allgather_gib_per_step']:.1f} GiB; {result[f'{mode}_allgathers_optimizer_step']} "
            f"of them after the optimizer step)")
        write(result, args.out)
    if rosa:
        rosa_resamples(mode, offload, split_first, module, opt, params, args, dev, result, dog)
    engine.destroy()


def rosa_resamples(mode, offload, split_first, module, opt, params, args, dev, result, dog) -> None:
    """First split (if not made before the steps), then one timed full resample per factorizer."""
    if not split_first:
        devices = sorted({p.ds_tensor.device.type for p in params})
        result[f"{mode}_adapter_partition_devices"] = ",".join(devices)
        write(result, args.out)
        result.update(first_split(module, opt, mode, dev, dog))
    for method in (args.offload_methods if offload else args.methods):
        dog.arm(f"{mode} resample {method}")
        timed = time_resample(module, opt, method, dev)
        suffix = "_zero3_offload" if offload else "_zero3"
        result.update({k + suffix: v for k, v in timed.items()})
        write(result, args.out)
    extras = [v for k, v in result.items()
              if k.startswith("resample_extra_gib_") and k.endswith("_zero3") and k != "resample_extra_gib_zero3"]
    if extras and not offload:
        result["resample_extra_gib_zero3"] = None if None in extras else max(extras)
    write(result, args.out)


def first_split(module, opt, mode: str, dev: torch.device, dog: Watchdog) -> dict:
    """resample(index=0) on the partitioned weights; seconds (max over ranks) and peak extra GiB."""
    from rosa_scale import resample

    dog.arm(f"{mode} first split")
    before = gib_allocated(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    start = time.perf_counter()
    resample(module, opt, index=0)
    sync(dev)
    secs = time.perf_counter() - start
    extra = None if before is None else gib_allocated(dev, peak=True) - before
    secs, extra = all_max([secs, extra], dev)
    log(f"{mode}: first split (eigh) {secs:.2f} s, extra {fmt(extra)} GiB")
    return {f"{mode}_first_split_s_eigh": secs, f"{mode}_first_split_extra_gib": extra}


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = init_distributed(args.device)
    import deepspeed
    import peft

    result = {}
    if args.append and Path(args.out).exists():
        result = json.loads(Path(args.out).read_text())
    result.update(header(args, dev))
    result.update({"deepspeed": deepspeed.__version__, "peft": peft.__version__, "engine": "deepspeed-zero3",
                   "param_dtype": "bfloat16" if dev.type == "cuda" or args.bf16 else "float32",
                   "reduce_dtype": None, "timed_steps": args.steps, "offload_timed_steps": args.offload_steps})
    log(f"{result['gpus']} x {result['gpu_name']}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"modes {args.modes}, {args.layers} layers, seq {args.seq}, batch {args.batch}")
    dog = None
    failed = False
    for mode in args.modes:
        dog = Watchdog(args.watchdog, result, args, mode)
        try:
            run_mode(mode, args, dev, result, dog)
        except Exception as err:
            failed = True
            result[f"{mode}_error"] = "".join(traceback.format_exception(err))
            print(f"[zero3_bench rank {dist.get_rank()}] {mode} failed:\n{result[f'{mode}_error']}", flush=True)
            write(result, args.out)
            if dist.get_rank() != 0:  # rank 0 may be killed before it fails too: keep this rank's traceback
                Path(f"{args.out}.rank{dist.get_rank()}-error.txt").write_text(result[f"{mode}_error"])
                time.sleep(3)  # and give rank 0 a moment to record its own failure in the JSON
            if dist.get_world_size() > 1:  # collectives may now be out of step across ranks: stop here
                dog.disarm()
                os._exit(1)
        dog.arm(f"{mode} teardown")
        fb.free_memory(dev)
        result[f"{mode}_leftover_gib"] = all_max([gib_allocated(dev)], dev)[0]
        dog.disarm()
        write(result, args.out)
    log(f"wrote {args.out}")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
