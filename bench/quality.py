"""Quality study: ROSA against PEFT LoRA and full fine-tuning of SmolLM2-135M-Instruct on real text.

Every run trains on the same token budget (``--steps`` x ``--batch`` x ``--seq``), with AdamW,
bf16 autocast, cosine decay after a warmup, gradient clipping at 1.0, and evaluates on the
validation split during training and on the test split at the end. Learning rates come from a
sweep scored on validation loss only; the test split never chooses anything.

Phases: ``sweep`` (every method and rank over its learning-rate grid, seed 0, extended one rung
at a time past an edge where the best rate sits), then ``final``
(two more seeds for the headline row, and the ROSA ablations at ROSA r=16's best rate; needs the
sweep's results), and ``quantized`` (ROSA and PEFT LoRA over a frozen bitsandbytes NF4 base, 3 seeds
each at the rate their unquantized counterpart's sweep chose, plus 2 more seeds of ROSA over a bf16-stored
base: issue #16). Runs go to a pool of worker processes sharing the GPUs (small models leave a
GPU mostly idle with one process); each finished run is one JSON file in ``--runs``, so a phase
can be stopped and started again and only missing runs are done. ``--budget-s`` stops handing
out runs that would not finish in time.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

ROSA_DEFAULTS = {"factorizer": "svd", "sampling": "random", "resample_every": 100, "reset_optimizer": True,
                 "rewarm_steps": 0, "model_dtype": "float32", "fixed_dtype": "model", "resample_stagger": 1}
LR_GRID = {"full": [1e-5, 3e-5, 1e-4], "lora": [3e-4, 1e-3, 3e-3], "rosa": [3e-4, 1e-3, 3e-3]}
# A sweep whose best rate is at an edge of what it tried goes one rung further along this ladder.
LR_LADDER = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
METHODS = [("full", None), ("lora", 4), ("lora", 16), ("lora", 64), ("rosa", 4), ("rosa", 16), ("rosa", 64)]
CORPORA = ("austen", "stdlib")
EVAL_BATCH = 8  # its fp32 logits (8 x 512 x 49,152) stay under 1 GiB
HEADLINE = [("full", None), ("lora", 16), ("rosa", 16)]
ABLATIONS = [{"factorizer": "eigh"}, {"factorizer": "qr"},
             {"sampling": "random-subset"}, {"sampling": "top"}, {"sampling": "bottom"},
             {"resample_every": 25}, {"resample_every": 50}, {"resample_every": 200}, {"resample_every": "epoch"},
             {"resample_every": None}, {"reset_optimizer": False}, {"rewarm_steps": 25},
             {"model_dtype": "bfloat16"}, {"model_dtype": "bfloat16", "fixed_dtype": "float32"}]
# Cells outside the ablation grid where a result asked a question: stdlib ROSA r=64 reaches the lowest
# validation loss of any run, then loses it after each resample. Is it the optimizer restart, the lack of
# LR re-warmup, or resampling itself?
PROBES = [(("stdlib", "rosa", 64), a)
          for a in ({"reset_optimizer": False}, {"rewarm_steps": 25}, {"resample_every": None})]
# Methods over a frozen NF4 base (issue #16): each targets the layers its unquantized counterpart adapts,
# quantized once by rosa_scale.quant.quantize_linear (bitsandbytes Linear4bit, nf4, double quantization),
# and trains at the rate the counterpart's sweep chose. "rosa-nf4" is apply_rosa(RosaConfig(quantize="nf4"))
# (a bf16 stack of finished windows beside the frozen base); "qlora" is PEFT LoRA on those Linear4bit layers.
QUANTIZED = {"rosa-nf4": "rosa", "qlora": "lora"}
QUANT_CELLS = [("austen", "rosa-nf4", 16), ("austen", "qlora", 16)]
QUANT_SEEDS = (0, 1, 2)
# Issue #17's cheap resample (qr, spread over 8 steps, what the shipped 8B configs use) against the
# default, 3 seeds at ROSA r=16's rate; with qr alone (seed 0 is the factorizer ablation) to tell them apart.
PERF_CHECKS = [({"factorizer": "qr", "resample_stagger": 8}, (0, 1, 2)), ({"factorizer": "qr"}, (1, 2))]
# ROSA over NF4 with the stack started at the rank-k fit of each layer's quantization error
# (RosaConfig.quant_error_rank): how much of the gap to ROSA over a bf16 base it closes.
ERROR_FITS = ({"quant_error_rank": 16}, {"quant_error_rank": 64})
# The literal bf16 base for ROSA: the model stored in bf16, so each resample rounds w_fixed to bf16. Seed 0 is
# the model_dtype ablation; the quantized phase adds seeds 1 and 2.
BF16_STORED = {"model_dtype": "bfloat16"}
# Linear4bit computes in the dtype its weight had (fp32 here): set to the autocast dtype, so the NF4 rows
# multiply in bf16 as autocast makes the unquantized rows do (QLoRA's bnb_4bit_compute_dtype=bfloat16).
NF4_COMPUTE_DTYPE = "bfloat16"


def family(method: str) -> str:
    """The method a spec trains like: ``rosa-nf4`` resamples like ``rosa``, ``qlora`` is ``lora``."""
    return QUANTIZED.get(method, method)


def run_id(spec: dict) -> str:
    """A file-name-safe name that says what the run is: corpus, method, rank, lr, seed, ablation."""
    head = spec["method"] + (f"-r{spec['rank']}" if spec.get("rank") else "")
    parts = [spec["corpus"], head, f"lr{spec['lr']:g}", f"s{spec['seed']}"]
    parts += [f"{k}={v}" for k, v in sorted(spec.get("ablation", {}).items())]
    return "_".join(parts).replace("/", "-")


# ---------------------------------------------------------------- one run (in a worker process)

def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _blocks(stream, seq: int):
    n = (len(stream) - 1) // seq
    return stream[: n * seq].view(n, seq).long()


def _evaluate(model, blocks, batch: int) -> float:
    """Mean next-token loss over every predicted token of ``blocks``."""
    import torch

    total, count = 0.0, 0
    model.eval()
    device = _device()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        for i in range(0, len(blocks), batch):
            ids = blocks[i:i + batch].to(device, non_blocking=True)
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
    model.train()
    return total / count


def _build(spec: dict, model_dir: str, factorize_device: str = "weight"):
    """The model for ``spec`` on the GPU, and the parameters the optimizer trains."""
    import torch
    from transformers import AutoModelForCausalLM

    opts = {**ROSA_DEFAULTS, **spec.get("ablation", {})}
    dtype = getattr(torch, opts["model_dtype"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(_device())
    model.config.use_cache = False
    if spec["method"] == "qlora":  # before the seed: the LoRA factors start as the lora run's of that seed
        _quantize_targets(model)
    torch.manual_seed(spec["seed"])
    if spec["method"] == "full":
        return model, [p for p in model.parameters() if p.requires_grad]
    if family(spec["method"]) == "lora":
        from peft import LoraConfig, get_peft_model

        # qlora: the quantized targets by name (PEFT's "all-linear" finds the same 7 per block, as for lora)
        targets = _target_names(model) if spec["method"] == "qlora" else "all-linear"
        model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                                                 target_modules=targets))
        _compute_nf4_in(model, NF4_COMPUTE_DTYPE)
        return model, [p for p in model.parameters() if p.requires_grad]
    if family(spec["method"]) == "rosa":
        from rosa_scale import RosaConfig, adapter_parameters, apply_rosa

        cfg = RosaConfig(rank=spec["rank"], method=opts["factorizer"], sampling=opts["sampling"],
                         fixed_dtype=opts["fixed_dtype"], seed=spec["seed"], factorize_device=factorize_device,
                         quantize="nf4" if spec["method"] == "rosa-nf4" else "none",
                         quant_error_rank=opts.get("quant_error_rank", 0))
        apply_rosa(model, cfg)
        _compute_nf4_in(model, NF4_COMPUTE_DTYPE)
        return model, adapter_parameters(model)
    if spec["method"] == "base":
        return model, []
    raise ValueError(f"unknown method {spec['method']!r}")


def _target_names(model) -> list[str]:
    """The layers ROSA adapts by default ("all-linear": every linear layer but the LM head)."""
    from rosa_scale import RosaConfig
    from rosa_scale.model import find_target_modules

    return find_target_modules(model, RosaConfig())


def _quantize_targets(model) -> None:
    """Replace ROSA's target layers by the frozen NF4 layers ``apply_rosa(quantize="nf4")`` makes of them."""
    from rosa_scale.quant import keep_standard_layout, quantize_linear

    for name in _target_names(model):
        q = quantize_linear(model.get_submodule(name), "nf4")
        keep_standard_layout(q)  # no CPU-only repacking at an eval (ROSA's base does the same)
        model.set_submodule(name, q)
    for p in model.parameters():
        p.requires_grad_(False)


def _compute_nf4_in(model, dtype: str) -> None:
    """Let every bitsandbytes Linear4bit multiply in ``dtype`` (its input is cast, its output cast back)."""
    import torch

    for m in _nf4_layers(model):
        m.compute_dtype = getattr(torch, dtype)


def _nf4_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]


def _effective_weights(model) -> dict:
    """Every ROSA layer's effective (out x in) weight in fp32: ``w_fixed + up down``, or for a quantized
    base ``deq(Q0) + stack + up down - up0 down0``."""
    from rosa_scale import rosa_layers

    return {name: layer.merged_weight() for name, layer in rosa_layers(model).items()}


def survival(start: dict, before: dict, after: dict) -> dict:
    """How much of each matrix's trained update a resample kept, on the run's own updates.

    The update of a window is ``D = before - start`` (effective weight just before the resample minus
    at the window's split); survival is ``<after - start, D> / |D|^2`` as in bench/quant_survival.py:
    1 keeps it all, 0 rounds it away. Returned: the norm-weighted survival over all matrices, the
    smallest and median per matrix, the update's size ``|D| / |W|`` and the jump ``|after - before| / |D|``."""
    import statistics

    num = den = jump = weight = 0.0
    per = []
    for name, w0 in start.items():
        d = before[name] - w0
        kept, dd = float(((after[name] - w0) * d).sum()), float(d.square().sum())
        num, den = num + kept, den + dd
        jump += float((after[name] - before[name]).square().sum())
        weight += float(w0.square().sum())
        per.append(kept / dd if dd else 1.0)
    return {"survival": num / den if den else 1.0, "survival_min": min(per), "survival_median": statistics.median(per),
            "update_rel": math.sqrt(den / weight), "jump_rel": math.sqrt(jump / den) if den else 0.0}


def _resample_step(model, opt, opts: dict, step: int, part: int, result: dict, start):
    """One resample (or part ``part`` of one spread over ``resample_stagger`` steps) into ``result``;
    a whole one also records the survival of the merged update. Returns the weights the next window
    starts from (``start`` unchanged for a part: training steps lie between the parts)."""
    from rosa_scale import resample

    parts, reset = opts["resample_stagger"], opt if opts["reset_optimizer"] else None
    if parts > 1:
        result["resample_s"] += resample(model, reset, part=(part, parts))
        result["resamples"] += int(part == parts - 1)
        return start
    before = _effective_weights(model)
    result["resample_s"] += resample(model, reset)
    result["resamples"] += 1
    after = _effective_weights(model)
    result["survival"].append({"step": step, **survival(start, before, after)})
    return after


def train_one(spec: dict, data_path: str, model_dir: str, out_dir: str, steps: int, batch: int, seq: int,
              eval_every: int, warmup: int, factorize_device: str = "weight") -> dict:
    """Train one spec, write ``<out_dir>/<run_id>.json`` atomically, and return it.

    ``factorize_device`` (where ROSA decomposes its matrices) changes rounding only, so it is
    recorded in the result but is not part of the run's id."""
    import torch

    from rosa_scale.schedule import lr_factor, resample_part

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    splits = torch.load(data_path)[spec["corpus"]]
    train, val, test = (_blocks(splits[k], seq) for k in ("train", "validation", "test"))
    opts = {**ROSA_DEFAULTS, **spec.get("ablation", {})}
    steps_per_epoch = len(train) // batch
    every = opts["resample_every"]
    every = steps_per_epoch if every == "epoch" else every
    device = _device()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, params = _build(spec, model_dir, factorize_device)
    resampled = family(spec["method"]) == "rosa"
    result = {"id": run_id(spec), "spec": spec, "options": opts, "steps": steps, "batch": batch, "seq": seq,
              "tokens": steps * batch * seq, "steps_per_epoch": steps_per_epoch,
              "trainable_params": sum(p.numel() for p in params), "curve": [], "resample_s": 0.0, "resamples": 0,
              "factorize_device": factorize_device, "torch_threads": torch.get_num_threads()}
    nf4 = _nf4_layers(model)
    if nf4:  # what the base is: how many layers, quantized how, multiplying in which dtype
        result["nf4_layers"] = len(nf4)
        result["nf4_quant_types"] = sorted({m.weight.quant_type for m in nf4})
        result["nf4_compute_dtypes"] = sorted({str(m.compute_dtype).removeprefix("torch.") for m in nf4})
    if resampled:
        result["survival"] = []  # one entry per resample (survival())
        start = _effective_weights(model)
    result["curve"].append((0, _evaluate(model, val, EVAL_BATCH)))
    if spec["method"] != "base":
        opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
        order = torch.Generator().manual_seed(spec["seed"])
        perm, pos, losses = torch.randperm(len(train), generator=order), 0, []
        train_start = time.perf_counter()
        for step in range(steps):
            part = resample_part(step, every, opts["resample_stagger"], steps) if resampled else None
            if part is not None:
                start = _resample_step(model, opt, opts, step, part, result, start)
            if pos + batch > len(perm):
                perm, pos = torch.randperm(len(train), generator=order), 0
            ids = train[perm[pos:pos + batch]].to(device, non_blocking=True)
            pos += batch
            factor = lr_factor(step, total_steps=steps, warmup_steps=warmup, schedule="cosine",
                               resample_every=every if resampled else None,
                               rewarm_steps=opts["rewarm_steps"] if resampled else 0)
            for group in opt.param_groups:
                group["lr"] = spec["lr"] * factor
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                result["curve"].append((step + 1, _evaluate(model, val, EVAL_BATCH)))
        result["train_s"] = time.perf_counter() - train_start
        result["train_loss_last50"] = torch.stack(losses[-50:]).float().mean().item()
        result["tok_s"] = result["tokens"] / result["train_s"]
    result["val_loss"] = result["curve"][-1][1]
    result["test_loss"] = _evaluate(model, test, EVAL_BATCH)
    result["test_ppl"] = math.exp(result["test_loss"])
    result["val_ppl"] = math.exp(result["val_loss"])
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    result["wall_s"] = time.perf_counter() - started
    result["finite"] = all(math.isfinite(v) for _, v in result["curve"]) and math.isfinite(result["test_loss"])
    path = Path(out_dir) / f"{result['id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(path)
    return result


# ---------------------------------------------------------------- phases (driver)

def sweep_specs(results: dict[str, dict] | None = None) -> list[dict]:
    """The grid of every method and rank, plus one rung past any edge where the best rate sits."""
    specs = [{"corpus": c, "method": "base", "rank": None, "lr": 0.0, "seed": 0} for c in CORPORA]
    for corpus in CORPORA:
        for method, rank in METHODS:
            lrs = LR_GRID[method] + edge_extension(results or {}, corpus, method, rank)
            specs += [{"corpus": corpus, "method": method, "rank": rank, "lr": lr, "seed": 0} for lr in lrs]
    return specs


def swept_runs(results: dict[str, dict], corpus: str, method: str, rank) -> list[dict]:
    """The sweep's runs of one cell: seed 0, default options."""
    return [r for r in results.values() if r["spec"]["corpus"] == corpus and r["spec"]["method"] == method
            and r["spec"].get("rank") == rank and r["spec"]["seed"] == 0 and not r["spec"].get("ablation")]


def edge_extension(results: dict[str, dict], corpus: str, method: str, rank) -> list[float]:
    """Rates beyond the grid that the sweep tried or now owes: while the best rate is the lowest
    (highest) one tried, the next lower (higher) rung of ``LR_LADDER`` is added, so a chosen rate
    is always bracketed by a worse one on each side."""
    tried = sorted({r["spec"]["lr"] for r in swept_runs(results, corpus, method, rank)})
    extra = [lr for lr in tried if lr not in LR_GRID[method]]
    best = best_lr(results, corpus, method, rank)
    if best is None or not set(LR_GRID[method]) <= set(tried):
        return extra
    rung = LR_LADDER.index(best)
    if best == tried[0] and rung > 0:
        extra.append(LR_LADDER[rung - 1])
    if best == tried[-1] and rung + 1 < len(LR_LADDER):
        extra.append(LR_LADDER[rung + 1])
    return sorted(set(extra))


def load_results(runs: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))}


def best_lr(results: dict[str, dict], corpus: str, method: str, rank) -> float | None:
    """The sweep's rate with the lowest final validation loss (seed 0, default options)."""
    cands = [r for r in swept_runs(results, corpus, method, rank) if r["finite"]]
    return min(cands, key=lambda r: r["val_loss"])["spec"]["lr"] if cands else None


def sweep_settled(results: dict[str, dict], corpus: str, method: str, rank) -> bool:
    """Whether every rate the sweep plans for this cell (grid and edge rungs) has a result."""
    done = {r["spec"]["lr"] for r in swept_runs(results, corpus, method, rank)}
    return set(LR_GRID[method] + edge_extension(results, corpus, method, rank)) <= done


def final_specs(results: dict[str, dict], settled_only: bool = False) -> list[dict]:
    """Seeds 1 and 2 of the headline rows, the ablations and the probes, at their sweep's best rate.
    ``settled_only``: only for cells whose sweep is finished (the rate can no longer change)."""
    def ready(corpus, method, rank):
        return best_lr(results, corpus, method, rank) is not None and (
            not settled_only or sweep_settled(results, corpus, method, rank))

    specs = []
    for corpus in CORPORA:
        for method, rank in HEADLINE:
            if ready(corpus, method, rank):
                lr = best_lr(results, corpus, method, rank)
                specs += [{"corpus": corpus, "method": method, "rank": rank, "lr": lr, "seed": s} for s in (1, 2)]
    if ready("austen", "rosa", 16):
        lr = best_lr(results, "austen", "rosa", 16)
        specs += [{"corpus": "austen", "method": "rosa", "rank": 16, "lr": lr, "seed": 0, "ablation": a}
                  for a in ABLATIONS]
    for (corpus, method, rank), a in PROBES:
        if ready(corpus, method, rank):
            lr = best_lr(results, corpus, method, rank)
            specs.append({"corpus": corpus, "method": method, "rank": rank, "lr": lr, "seed": 0, "ablation": a})
    return specs


def quantized_specs(results: dict[str, dict]) -> list[dict]:
    """Issue #16: 3 seeds of each ``QUANT_CELLS`` method at its unquantized counterpart's best rate (no
    sweep of its own: the same rate isolates what the base changes), and seeds 1, 2 of ROSA over a
    bf16-stored base at ROSA's rate (seed 0 is the ``model_dtype`` ablation). Only for cells whose
    counterpart's sweep is settled."""
    specs = []
    for corpus, method, rank in QUANT_CELLS:
        counterpart = (corpus, family(method), rank)
        if best_lr(results, *counterpart) is not None and sweep_settled(results, *counterpart):
            lr = best_lr(results, *counterpart)
            specs += [{"corpus": corpus, "method": method, "rank": rank, "lr": lr, "seed": s} for s in QUANT_SEEDS]
            if method == "rosa-nf4":
                specs += [{"corpus": corpus, "method": method, "rank": rank, "lr": lr, "seed": s, "ablation": fit}
                          for fit in ERROR_FITS for s in QUANT_SEEDS]
    if best_lr(results, "austen", "rosa", 16) is not None and sweep_settled(results, "austen", "rosa", 16):
        lr = best_lr(results, "austen", "rosa", 16)
        specs += [{"corpus": "austen", "method": "rosa", "rank": 16, "lr": lr, "seed": s, "ablation": BF16_STORED}
                  for s in QUANT_SEEDS if s]
    return specs


def perf_specs(results: dict[str, dict]) -> list[dict]:
    """Issue #17: ``PERF_CHECKS`` at ROSA r=16's rate on Austen, once its sweep is settled."""
    lr = best_lr(results, "austen", "rosa", 16)
    if lr is None or not sweep_settled(results, "austen", "rosa", 16):
        return []
    return [{"corpus": "austen", "method": "rosa", "rank": 16, "lr": lr, "seed": s, "ablation": a}
            for a, seeds in PERF_CHECKS for s in seeds]


def plan(phase: str, results: dict[str, dict], only: str | None = None) -> list[dict]:
    """The runs a phase wants given the results so far: ``sweep`` (grid + edge rungs), ``final``,
    ``all`` (the sweep, plus the final runs of every cell whose sweep is settled) or ``quantized``
    (``quantized_specs``)."""
    specs = sweep_specs(results) if phase in ("sweep", "all", "list") else []
    if phase in ("final", "list"):
        specs += final_specs(results)
    elif phase == "all":
        specs += final_specs(results, settled_only=True)
    if phase in ("quantized", "list"):
        specs += quantized_specs(results)
    if phase in ("perf", "list"):
        specs += perf_specs(results)
    if only:
        specs = [s for s in specs if any(part in run_id(s) for part in only.split(","))]
    return specs


def drive(phase: str, args, deadline: float, timing: dict) -> None:
    """Hand runs to ``--workers`` processes per GPU until the phase's plan is done or the budget is.

    The plan is recomputed from the result files whenever a worker is free, so a finished sweep
    run can add an edge rung or release its cell's seeds while other runs are still going. A run
    starts only if the longest run seen so far (``timing``) would end before ``deadline``."""
    import torch

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    gpus = max(1, torch.cuda.device_count())
    slots = args.workers * gpus
    pending, started = {}, set()

    def todo() -> list[dict]:
        return [s for s in plan(phase, load_results(runs), args.only)
                if run_id(s) not in started and not (runs / f"{run_id(s)}.json").exists()]

    waiting = todo()
    print(f"{len(waiting)} runs to do now ({len(load_results(runs))} done), {slots} workers on {gpus} GPUs",
          flush=True)
    free = list(range(slots))
    pools = [ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_pin, initargs=(i % gpus,))
             for i in range(slots)]
    try:
        while True:
            while waiting and free and time.monotonic() + 1.2 * timing["longest_s"] < deadline:
                slot, spec = free.pop(), waiting.pop(0)
                started.add(run_id(spec))
                fut = pools[slot].submit(train_one, spec, args.data, args.model, str(runs), args.steps, args.batch,
                                         args.seq, args.eval_every, args.warmup, args.factorize_device)
                pending[fut] = (slot, spec, time.monotonic())
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                slot, spec, t0 = pending.pop(fut)
                free.append(slot)
                timing["longest_s"] = max(timing["longest_s"], time.monotonic() - t0)
                try:
                    r = fut.result()
                    print(f"{r['id']}: val {r['val_loss']:.4f} test ppl {r['test_ppl']:.3f} "
                          f"{r.get('tok_s', 0):.0f} tok/s {r['wall_s']:.0f} s", flush=True)
                except Exception as err:  # one failed run must not stop the study; it is reported
                    print(f"FAILED {run_id(spec)}: {type(err).__name__}: {err}", flush=True)
            waiting = todo()
        if waiting:
            print(f"budget reached: {len(waiting)} runs left for a later call", flush=True)
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


def _pin(gpu: int) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["sweep", "final", "all", "quantized", "perf", "list"])
    parser.add_argument("--data", required=True, help="token file from bench/quality_data.py")
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct Hugging Face folder")
    parser.add_argument("--runs", required=True, help="folder of per-run JSON results")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--workers", type=int, default=6,
                        help="worker processes per GPU (each holds ~15 GiB on an H200; 10 ran out of memory)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="start no run that would not end within this many seconds of the start")
    parser.add_argument("--expect-s", type=float, default=0.0,
                        help="a run's expected seconds before any has finished (measured: ~200 s on one "
                             "H200 shared by 6 runs of 2M tokens)")
    parser.add_argument("--factorize-device", choices=["weight", "cpu"], default="weight",
                        help="RosaConfig.factorize_device for ROSA runs (cpu: set OMP_NUM_THREADS per worker)")
    parser.add_argument("--only", default=None, help="run only specs whose id contains one of these comma-separated texts")
    args = parser.parse_args()
    if args.phase != "list":
        for what, path in (("--data", Path(args.data)), ("--model", Path(args.model) / "config.json")):
            if not path.is_file():
                raise SystemExit(f"quality.py: error: {what}: {path} not found")
    if args.phase == "list":
        print("\n".join(run_id(s) for s in plan("list", load_results(Path(args.runs)), args.only)))
        return
    drive(args.phase, args, time.monotonic() + args.budget_s, {"longest_s": args.expect_s})


if __name__ == "__main__":
    main()
