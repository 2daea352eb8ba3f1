"""RosaConfig (the method) and TrainConfig (a `rosa-train` run): dataclasses, validated on load.

A run's config comes from defaults, then a YAML file, then command-line overrides; every key
is checked against the dataclass so a typo fails at once with a line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

# transformers' attention implementations (its AttentionInterface plus eager)
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names it."""


@dataclass
class RosaConfig:
    """Which layers get ROSA factors and how the trained subspace is chosen."""

    rank: Union[int, float] = 16
    """Trainable rank per matrix: an int, or a fraction in (0, 1) of min(out, in)."""
    target_modules: Union[str, list[str]] = "all-linear"
    """'all-linear' (every linear layer but the LM head), a list of module names or name
    suffixes (e.g. [q_proj, v_proj]), or a regular expression matched against full names."""
    exclude_modules: list[str] = field(default_factory=list)
    """Module names or suffixes never wrapped, even if targeted."""
    method: Literal["svd", "eigh", "qr"] = "eigh"
    """Factorizer: 'eigh' (singular vectors from the gram matrix's eigendecomposition: 3x faster
    than 'svd' on an H200 for SmolLM2-135M, 10x for Llama-3-8B shapes, 2x on CPU, same quality),
    'svd' (exact singular vectors) or 'qr' (a random orthogonal subspace, cheapest).
    Measured: bench/results/quality-*.md (ablations), bench/results/svd-speed-*.md."""
    factorize_device: Literal["weight", "cpu"] = "weight"
    """Where each matrix is decomposed: on the weight's device, or on CPU. An idle GPU is faster;
    the CPU wins when the GPU is shared with other work (a SmolLM2 resample: 10-13 s on 2 CPU
    threads against 36-38 s on an H200 running 6-7 jobs; bench/results/svd-speed-*.md)."""
    sampling: Literal["random", "random-subset", "top", "bottom"] = "random"
    """Which singular triplets to train: a random contiguous window, a random subset,
    the largest or the smallest."""
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fixed_dtype: Literal["model", "float32"] = "model"
    """Storage of the frozen residual W_fixed: the model's dtype, or float32. With a bf16 model
    each resample re-rounds W_fixed, adding noise like one more cast of the weight to bf16
    (growing as the square root of the number of resamples); float32 removes it for 2 more
    bytes per adapted weight."""
    stochastic_rounding: bool = False
    """Round W_fixed to bf16 stochastically at each resample (measured: more noise than
    round-to-nearest, no bias removed; kept for experiments)."""
    seed: int = 0
    """Seeds the choice of triplets: (seed, resample index, module name) -> window."""
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    """Quantize the targeted layers once with bitsandbytes (4-bit nf4/fp4 with double quantization,
    or int8) and keep them frozen: each resample folds the trained window into a low-rank stack
    beside the base instead of re-quantizing it (see rosa_scale/quant.py). One process, DDP or FSDP2
    (the quantized base whole on each process); not DeepSpeed ZeRO-3. rosa-train quantizes while
    loading. fixed_dtype and stochastic_rounding do not apply."""
    quant_error_rank: int = 0
    """With a quantized base: start each layer's stack with the best rank-k fit of its quantization
    error ``W0 - deq(Q(W0))`` (an SVD of the original weight's error, once), so training starts
    nearer the unquantized model; costs k(m+n) stack values per matrix (k capped below the smaller
    side). 0: the base as quantized."""
    stack_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage of the stack of finished windows with a quantized base. bf16 rounds each folded
    update by ~2^-9 of the update itself (its factors are differences); float32 keeps it exactly
    at twice the memory."""
    fused: bool = True
    """Compute each adapted layer as one autograd node whose adapter terms are added inside the base
    layer's GEMMs (rosa_scale/fused_linear.py) wherever that is the same function (a plain linear
    layer without hooks, in one dtype or under autocast); false: base and factors as separate operations."""
    shared_inputs: list[list[str]] = field(default_factory=lambda: [["q_proj", "k_proj", "v_proj"],
                                                                    ["gate_proj", "up_proj"], ["w1", "w3"]])
    """Sibling layers (by name, under one parent) that the model calls on the same input: with ``fused``,
    their ``x @ down^T`` is one GEMM and their input-side backward one pass over ``x``
    (rosa_scale/shared_input.py). Same function; [] turns it off. Names absent from a model do nothing."""


@dataclass
class TrainConfig:
    """One `rosa-train` run. `builtin:` names are offline defaults the package builds itself."""

    model: str = "builtin:smollm2-135m-instruct"
    """A local Hugging Face model folder, a hub name, or builtin:smollm2-135m-instruct."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the model (the frozen weights); the factors use rosa.adapter_dtype."""
    dataset: str = "builtin:stdlib-docs"
    """A local .txt/.json/.jsonl/.parquet file or folder, a hub dataset name, or
    builtin:stdlib-docs (the local Python's standard-library documentation)."""
    dataset_config: Union[str, None] = None
    text_field: str = "text"
    eval_dataset: Union[str, None] = None
    """Held-out data (same forms as `dataset`); if unset, a split named validation/test of the
    dataset is used, else `eval_fraction` of its documents."""
    eval_fraction: float = 0.05
    block_size: int = 256
    """Tokens per training sequence; documents are packed into blocks of this length."""
    packing: Literal["auto", "documents", "padded", "concatenated"] = "auto"
    """How documents share a block: `documents` packs several, none seeing another (position ids
    restart per document; models whose attention builds its mask with transformers' masking
    utilities, sdpa or eager); `padded` gives each its own block(s); `concatenated` joins plain text
    into one stream; `auto` is `documents` where the model allows it, else `padded`."""
    max_train_blocks: Union[int, None] = None
    max_eval_blocks: Union[int, None] = 64
    output_dir: str = "runs/rosa"
    seed: int = 0
    max_steps: Union[int, None] = 48
    """Optimizer steps; if null, `epochs` passes over the data."""
    epochs: float = 1.0
    batch_size: int = 4
    """Sequences per device per micro-step."""
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    """AdamW on the factors: torch's (fused on CUDA), or bitsandbytes' 8-bit AdamW (its moments in
    uint8 with per-block scales: a quarter of the state), optionally paged to host memory when the
    GPU runs short. A resample clears each kind's whole per-factor state."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 5
    rewarm_steps: int = 0
    """After each resample, ramp the learning rate up again over this many steps (0: none). Needed
    when the optimizer's step does not restart with the factors' zeroed moments (DeepSpeed ZeRO-3,
    factors sharing an optimizer param group with other trainable parameters): then updates
    overshoot up to 6.6x, and about 1/(1-beta2) steps (1000 for AdamW), with resample_every above
    it, keep them <= ~1.3x the rate. rosa-train's optimizer holds the factors alone (exact restart)."""
    resample_every: Union[int, Literal["epoch"], None] = 16
    """Optimizer steps between resamples, 'epoch', or null for never."""
    resample_stagger: int = 1
    """Spread each resample over this many consecutive steps, each resplitting a group of the
    matrices of about equal cost (``resample.resample_parts``), so no step waits for the whole
    resample; every matrix still gets a new window every resample_every steps. 1: all at once.
    Under DeepSpeed ZeRO-3 a partial reset zeroes the moments but keeps its group's step count."""
    reset_optimizer: bool = True
    """Clear the optimizer state of the factors at each resample (their meaning changed)."""
    eval_every: Union[int, None] = None
    """Evaluate every N steps (always before and after training)."""
    log_every: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    loss_chunk_tokens: Union[int, None] = None
    """Compute the LM head and the loss this many tokens at a time, recomputed in backward, so the
    full-vocabulary fp32 logits never exist whole (2 GiB at B=2, S=2048 with a 128k vocabulary, and as
    much for their gradient), in training and evaluation, under every engine. Needs a model whose
    forward takes ``logits_to_keep`` (Llama, Qwen2, Mistral and most current causal LMs)."""
    report_to: str = "auto"
    """Where metrics go besides metrics.jsonl: comma-separated trackers (tensorboard, wandb, mlflow,
    comet_ml, aim, clearml, dvclive; the others through accelerate), none, or auto (TensorBoard when it
    is installed). Each gets every record: loss, learning rate, tokens/s, eval loss and perplexity,
    resample seconds (and part)."""
    compile: Union[bool, Literal["auto"]] = "auto"
    """Compile each decoder layer with torch.compile before sharding (same function, fused steps:
    ROSA and the frozen base both ~1.3x faster on an H200). auto: on a CUDA device with one process,
    DDP or fsdp: true, except with a quantized base (whose stack grows at each resample); not under
    DeepSpeed or accelerate's FSDP plugin. true compiles in those cases too, and says in one line why
    it cannot where it cannot."""
    attn_implementation: Union[str, None] = None
    """The attention kernel, as transformers names it: sdpa (its default), eager, flex_attention
    (block-sparse masks, so packed documents need no dense mask), flash_attention_2/3 where installed
    (packing then puts one document per block: their packed path needs a batch of one). null: the
    model's default."""
    gc_every: Union[int, None] = 50
    """Python's automatic garbage collection stays off while training; every process collects the young
    generations together every N optimizer steps instead. A collection that starts at a random moment
    on one process stalls all the others at the next collective (single steps of 2x the median on
    2 H200s; with collections every 50 steps none above 1.63x). null: Python's own collection."""
    fsdp: bool = False
    """Shard the model with FSDP2 (fully_shard per decoder layer and the root; bf16 compute and
    fp32 gradient reduction with mixed_precision bf16) under a torchrun or accelerate launch.
    Launching with accelerate's FSDP2 config (configs/accelerate/fsdp2.yaml) does the same."""
    fsdp_factors: Literal["auto", "sharded", "replicated"] = "auto"
    """With fsdp: true, the ROSA factors sharded like the weights, or whole on every process (FSDP2
    leaves them out; their gradients are averaged in one all-reduce per step and AdamW steps them as
    plain tensors: a 1.1-4.5% faster step on an H200 at Llama-3-8B, r=16, bench/NOTES.md). Replicated
    costs each process the factors' whole fp32 state (~0.6 GiB at Llama-3-8B, r=16). auto: replicated
    while the factors hold at most 64 Mi numbers (1 GiB of fp32 weights, gradients and AdamW moments),
    sharded above."""
    zero3_leaf_layers: bool = True
    """Under DeepSpeed ZeRO-3, fetch each decoder layer whole (DeepSpeed leaf modules): fewer hooks,
    a faster step (1.8x measured on a Llama-3-8B shape), the same results."""
    save_every: Union[int, None] = None
    """Save a sharded checkpoint (model, optimizer, data position, RNG) every N steps and at the end."""
    keep_last: Union[int, None] = 2
    """Checkpoints to keep (older ones are deleted); null keeps all."""
    resume: Union[str, None] = None
    """Continue from a checkpoint: 'auto' (the newest in output_dir, if any) or a path."""
    resume_override: list[str] = field(default_factory=list)
    """Config keys a resume may change although they alter the training (e.g. [lr]); any other such
    change is refused. Evaluation, logging, saving, paths and a larger max_steps may always change."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds another run's checkpoints, deleting its checkpoints,
    metrics and merged model (without it, such a run is refused unless it resumes)."""
    max_skipped_steps: int = 0
    """Steps with a non-finite loss or gradient that may be skipped (no update) before the run stops;
    0 stops at the first. Not available under DeepSpeed ZeRO-3, which updates inside backward."""
    save_merged: bool = True
    """Write the merged model (plain architecture, safetensors) to <output_dir>/merged."""
    rosa: RosaConfig = field(default_factory=RosaConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError; ints pass as floats, '1e-3' as a float."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _build(cls: type, values: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{guess[0]}'?)" if guess else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' must be a mapping of its own keys")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except TypeError:
            raise ConfigError(f"config key '{prefix}{key}' must be {_type_name(tp)}, got {value!r}") from None
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    positive = {"block_size": cfg.block_size, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "log_every": cfg.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    for key in ("max_steps", "resample_every", "eval_every", "max_train_blocks", "max_eval_blocks", "save_every",
                "keep_last", "loss_chunk_tokens", "gc_every"):
        value = getattr(cfg, key)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1 or null, got {value}")
    if cfg.attn_implementation not in (None, *ATTENTION):
        raise ConfigError(f"config key 'attn_implementation' must be one of {', '.join(ATTENTION)} or null, "
                          f"got {cfg.attn_implementation!r}")
    if cfg.lr <= 0:
        raise ConfigError(f"config key 'lr' must be > 0, got {cfg.lr}")
    if cfg.epochs <= 0:
        raise ConfigError(f"config key 'epochs' must be > 0, got {cfg.epochs}")
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ConfigError(f"config key 'eval_fraction' must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.resample_stagger < 1:
        raise ConfigError(f"config key 'resample_stagger' must be >= 1, got {cfg.resample_stagger}")
    if isinstance(cfg.resample_every, int) and cfg.resample_stagger > cfg.resample_every:
        raise ConfigError(f"config key 'resample_stagger' ({cfg.resample_stagger}) must be at most "
                          f"resample_every ({cfg.resample_every})")
    if cfg.fsdp_factors == "replicated" and not cfg.fsdp:
        raise ConfigError("config key 'fsdp_factors' replicated needs fsdp: true (rosa-train's own FSDP2 sharding)")
    for key in ("warmup_steps", "rewarm_steps", "max_skipped_steps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(cfg, key)}")
    validate_rosa(cfg.rosa, prefix="rosa.")


REPLICATED_FACTORS_MAX_NUMBERS = 64 * 2**20  # 16 bytes each (fp32 weight, gradient, two AdamW moments): 1 GiB


def factors_replicated(cfg: TrainConfig, factor_numbers: int) -> bool:
    """Whether rosa-train's FSDP2 leaves the ROSA factors whole on every process (``fsdp_factors``
    resolved for a model whose factors hold ``factor_numbers`` numbers)."""
    if not cfg.fsdp or cfg.fsdp_factors == "sharded":
        return False
    return cfg.fsdp_factors == "replicated" or factor_numbers <= REPLICATED_FACTORS_MAX_NUMBERS


def validate_rosa(rosa: RosaConfig, prefix: str = "") -> None:
    """Every field against its declared type (as a YAML file is checked), then the rank rules; a
    RosaConfig built in Python gets the same one-line errors as a config file."""
    hints = typing.get_type_hints(RosaConfig)
    for f in dataclasses.fields(RosaConfig):
        value = getattr(rosa, f.name)
        try:
            _coerce(value, hints[f.name])
        except TypeError:
            raise ConfigError(f"config key '{prefix}{f.name}' must be {_type_name(hints[f.name])}, got {value!r}") from None
    rank = rosa.rank
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ConfigError(f"config key '{prefix}rank' must be an int or a fraction in (0, 1), got {rank!r}")
    if isinstance(rank, float) and not 0.0 < rank < 1.0:
        raise ConfigError(f"config key '{prefix}rank' as a fraction must be in (0, 1), got {rank}")
    if isinstance(rank, int) and rank < 1:
        raise ConfigError(f"config key '{prefix}rank' must be >= 1, got {rank}")
    if rosa.quant_error_rank < 0:
        raise ConfigError(f"config key '{prefix}quant_error_rank' must be >= 0, got {rosa.quant_error_rank}")
    if rosa.quant_error_rank and rosa.quantize == "none":
        raise ConfigError(f"config key '{prefix}quant_error_rank' needs '{prefix}quantize' (nf4, fp4 or int8)")
    if rosa.method == "qr" and rosa.sampling != "random":
        raise ConfigError(f"config key '{prefix}sampling' must be 'random' with method 'qr' (a random subspace)")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"rosa.rank": 16, ...}`` (the dotted keys the command line uses)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < YAML file < overrides (dotted keys such as 'rosa.rank'), validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    cfg = _build(TrainConfig, tree)
    _validate(cfg)
    return cfg


def rosa_config(**values: Any) -> RosaConfig:
    """A validated RosaConfig from keyword values (same checks as a YAML file)."""
    cfg = _build(RosaConfig, values)
    validate_rosa(cfg)
    return cfg


def cli_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, type, help) for every leaf field, for building command-line options."""
    out = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(cli_fields(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", tp, docs.get(f.name, "")))
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field in the class body, used as its --help text."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, last = {}, None
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif last and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            docs[last] = " ".join(str(node.value.value).split())
            last = None
        else:
            last = None
    return docs
