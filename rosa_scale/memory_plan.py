"""``rosa-train --dry-run``: what a run will adapt and an estimate of its peak memory per GPU.

Built from the model's config alone (parameters on the meta device, nothing loaded), for the number
of processes and the GPU memory given, so a 70B plan can be checked on a laptop. The estimate adds
up what a step holds at its peak: the frozen weights (sharded under FSDP2, whole under DDP or with a
quantized base), FSDP2's gathered copies of two decoder layers, the factors with their gradients and
optimizer state, the activations, and the logits. Two constants come from measurements on H200s
(Llama-3-8B shape, B=2, S=2048, one GPU, ``bench/results/perf-2026-11-30-1gpu-compiled.json`` and
``fsdp2-2026-11-28-1gpu.json``): the activations of one decoder layer per token and per unit of
``hidden + intermediate`` width (compiled layers; eager ones hold 1.29x that). The other measured
setups (2 GPUs, checkpointing, chunked loss) are checked against it in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import RosaConfig, TrainConfig, factors_replicated
from .engines.plan import factorization_cost, plan_owners
from .layer import linear_shape, resolve_rank

GIB = 2**30
ACT_BYTES_PER_UNIT = 8.5    # one layer's activations per token per (hidden + intermediate), bf16, compiled
EAGER_FACTOR = 1.29         # eager layers (compile off, or on a CPU) keep this much more
LOGIT_BYTES = {2: 10, 4: 12}  # whole-vocabulary logits per token: bf16 logits + fp32 copy + gradient; fp32
CHUNK_LOGIT_COPIES = 3       # a chunk's fp32 logits, softmax and gradient
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 * 1.1, "fp4": 0.5 + 1 / 64 * 1.1, "int8": 1.0 + 4 / 4096}


@dataclass
class Plan:
    layers: dict[str, tuple[int, int, int]]  # target name -> (out, in, rank)
    trainable: int
    total_params: int
    parts: dict[str, float]  # GiB per GPU
    owners: list[tuple[int, float]]  # per rank: matrices, share of the factorization cost

    @property
    def peak_gib(self) -> float:
        return sum(self.parts.values())


def meta_model(path: str, dtype: str, attn_implementation: str | None = None):
    """The model of folder ``path`` with its parameters on the meta device."""
    from .sharded_loading import empty_model

    return empty_model(path, dtype, attn_implementation)


def estimate(model, cfg: TrainConfig, processes: int, compiled: bool = True) -> Plan:
    """The plan for ``model`` (meta parameters are enough) trained as ``cfg`` says on ``processes`` GPUs."""
    from .compiled_layers import decoder_layers
    from .model import find_target_modules

    rosa: RosaConfig = cfg.rosa
    names = find_target_modules(model, rosa)
    layers = {}
    for n in names:
        out_f, in_f = linear_shape(model.get_submodule(n))
        layers[n] = (out_f, in_f, resolve_rank(rosa.rank, out_f, in_f))
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model_dtype]
    compute = 2 if cfg.mixed_precision in ("bf16", "fp16") else width
    shard = processes if cfg.fsdp and processes > 1 else 1
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    target_params = sum(o * i for o, i, _ in layers.values())
    factors = sum(r * (o + i) for o, i, r in layers.values())
    parts = {}
    if rosa.quantize != "none":  # whole on every rank; the rest of the model in its dtype
        stack = rosa.quant_error_rank * sum(o + i for o, i, _ in layers.values()) * 2
        parts["frozen weights (quantized targets whole per GPU)"] = (
            target_params * QUANT_BYTES[rosa.quantize] + (total - target_params) * width / shard + stack) / GIB
    else:
        fixed = width if rosa.fixed_dtype == "model" else 4
        parts["frozen weights"] = (target_params * fixed + (total - target_params) * width) / shard / GIB
    blocks = decoder_layers(model)
    if cfg.fsdp and blocks:  # FSDP2 gathers one layer while the next is prefetched
        largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        parts["FSDP2 gathered layers"] = 2 * largest * compute / GIB
    state = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}[cfg.optimizer]
    whole = factors_replicated(cfg, factors)  # FSDP2 leaves them unsharded on every process
    parts["factors + gradients + optimizer"] = factors * (4 + 4 + state) / (1 if whole else shard) / GIB
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    inner = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    tokens = cfg.batch_size * cfg.block_size
    per_layer = tokens * (hidden + inner) * ACT_BYTES_PER_UNIT * (compute / 2) * (1 if compiled else EAGER_FACTOR)
    n_layers = max(len(blocks), 1)
    if cfg.gradient_checkpointing:  # each layer's input kept; the layer in backward holds its recomputed
        parts["activations"] = (n_layers * tokens * hidden * compute + 2 * per_layer) / GIB  # activations and their gradients
    else:
        parts["activations"] = n_layers * per_layer / GIB
    if getattr(config, "_attn_implementation", None) == "eager":  # the others never hold the S x S matrices
        kept = 1 if cfg.gradient_checkpointing else n_layers
        parts["attention matrices (eager)"] = kept * eager_attention_bytes(config, cfg, compute) / GIB
    vocab = config.vocab_size
    if cfg.loss_chunk_tokens:
        parts["logits (chunked)"] = min(cfg.loss_chunk_tokens, tokens) * vocab * 4 * CHUNK_LOGIT_COPIES / GIB
    else:
        parts["logits"] = tokens * vocab * LOGIT_BYTES[compute] / GIB
    shapes = {n: (o, i) for n, (o, i, _) in layers.items()}
    owners_map = plan_owners(shapes, processes)
    cost = {n: factorization_cost(*shapes[n]) for n in shapes}
    whole = sum(cost.values()) or 1
    owners = [(sum(1 for n in shapes if owners_map[n] == r),
               sum(cost[n] for n in shapes if owners_map[n] == r) / whole) for r in range(max(owners_map.values()) + 1)]
    return Plan(layers, factors, total, parts, owners)


def eager_attention_bytes(config, cfg: TrainConfig, compute: int) -> int:
    """One layer's attention probabilities kept for backward by eager attention: the float32 softmax
    and its copy in the compute dtype, batch x heads x block_size^2 each (computed, not measured)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    return cfg.batch_size * heads * cfg.block_size ** 2 * (4 + compute)


def advice(plan: Plan, cfg: TrainConfig, processes: int, gpu_gib: float) -> list[str]:
    """Settings that lower the peak, the largest part first, when it does not fit."""
    if plan.peak_gib <= gpu_gib:
        return []
    tips = []
    if "attention matrices (eager)" in plan.parts:
        tips.append("attn_implementation: sdpa (eager keeps every attention matrix)")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing: true (keeps one layer's activations instead of all)")
    if not cfg.loss_chunk_tokens:
        tips.append("loss_chunk_tokens: 1024 (the logits a chunk at a time)")
    if not cfg.fsdp and cfg.rosa.quantize == "none":
        tips.append("fsdp: true on more GPUs (the frozen weights sharded across them)")
    if cfg.rosa.fixed_dtype == "float32":
        tips.append("rosa.fixed_dtype: model (2 bytes less per adapted weight)")
    if cfg.rosa.quantize == "none":
        tips.append("rosa.quantize: nf4 (the adapted weights in 4 bits, frozen)")
    if cfg.batch_size > 1:
        tips.append(f"batch_size: {cfg.batch_size // 2} with grad_accum: {cfg.grad_accum * 2} (same global batch)")
    return tips


def describe(plan: Plan, cfg: TrainConfig, processes: int, gpu_gib: float) -> str:
    kinds: dict[tuple[str, int], int] = {}
    for name, (_, _, r) in plan.layers.items():
        key = (name.rsplit(".", 1)[-1], r)
        kinds[key] = kinds.get(key, 0) + 1
    lines = [f"ROSA on {len(plan.layers)} layers: " + ", ".join(f"{k} x{c} (rank {r})" for (k, r), c in sorted(kinds.items())),
             f"trainable {plan.trainable:,} of {plan.total_params:,} parameters ({100 * plan.trainable / plan.total_params:.2f}%)",
             "factorization plan: " + "; ".join(f"rank {r}: {m} matrices, {100 * s:.0f}% of the work"
                                                for r, (m, s) in enumerate(plan.owners)),
             f"estimated peak per GPU ({processes} process{'es' if processes > 1 else ''}"
             f"{', FSDP2' if cfg.fsdp else ''}, batch {cfg.batch_size} x {cfg.block_size} tokens):"]
    lines += [f"  {name:<48} {gib:7.2f} GiB" for name, gib in plan.parts.items()]
    fits = plan.peak_gib <= gpu_gib
    lines.append(f"  {'total':<48} {plan.peak_gib:7.2f} GiB of {gpu_gib:g} GiB: "
                 f"{'fits' if fits else 'does NOT fit'}")
    tips = advice(plan, cfg, processes, gpu_gib)
    if tips:
        lines.append("to fit, change (largest saving first): " + "; ".join(tips))
    return "\n".join(lines)


def dry_run(cfg: TrainConfig, processes: int, gpu_gib: float) -> str:
    """The resolved config's plan as text (``rosa-train --dry-run``); loads nothing but the config."""
    import yaml

    from .config import to_dict
    from .loading import resolve_model_path

    model = meta_model(resolve_model_path(cfg.model), cfg.model_dtype, cfg.attn_implementation)
    compiled = cfg.compile is True or (cfg.compile == "auto" and cfg.rosa.quantize == "none")  # auto, on a GPU
    plan = estimate(model, cfg, processes, compiled=compiled)
    return "resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + describe(plan, cfg, processes, gpu_gib)
