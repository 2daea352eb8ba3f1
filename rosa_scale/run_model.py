"""The model of a rosa-train run, made ready for its engine: loaded (quantized while loading, or
built empty and filled into FSDP2 shards, or whole), ROSA-wrapped, checkpointed, compiled, sharded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compiled_layers import compile_decoder_layers, compile_unavailable
from .compiled_layers import decoder_layers as find_decoder_layers
from .config import ConfigError, TrainConfig, factors_replicated
from .loading import load_model
from .model import adapter_parameters, apply_rosa
from .quant_loading import OriginalWeights, is_prequantized, load_quantized_model
from .sharded_loading import can_stream, empty_model, fill


@dataclass
class Prepared:
    model: torch.nn.Module
    compiled: int  # decoder layers compiled
    quantized: bool  # the ROSA targets are a frozen quantized base
    own_fsdp: bool  # sharded here (fsdp: true), not by accelerate
    split_after_prepare: bool  # the first split is still to be made, on the shards



def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, under the name the installed
    transformers has (``activation_checkpointing_enable`` since 5.x; ``gradient_checkpointing_enable`` before)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

def prepare_model(cfg: TrainConfig, accelerator, model_path: str, *, accelerate_fsdp: bool,
                  deepspeed: bool) -> Prepared:
    """The model for ``cfg`` under the engine the launch chose. Under FSDP2 (accelerate's plugin, or
    ``fsdp: true`` under torchrun) and ZeRO-3 the first split is left for after sharding, spread over
    the ranks; otherwise it is made here, on the full weights."""
    device = accelerator.device
    quantized = cfg.rosa.quantize != "none" or is_prequantized(model_path)
    own_fsdp = cfg.fsdp and not (accelerate_fsdp or deepspeed)
    streamed = own_fsdp and not quantized and can_stream(model_path)  # read into its shards after sharding
    if quantized:  # quantized while loading, on its device: never whole in the model's dtype
        model = load_quantized_model(model_path, cfg.model_dtype, cfg.rosa, device, cfg.attn_implementation)
    elif streamed:
        model = empty_model(model_path, cfg.model_dtype, cfg.attn_implementation)
    else:
        model = load_model(model_path, cfg.model_dtype, cfg.attn_implementation)
    if not (deepspeed or quantized or streamed):  # DeepSpeed places (and may already have partitioned) the weights
        if accelerate_fsdp:
            _refuse_whole_model_beyond_gpu(model, device)
        model.to(device)
    split_after_prepare = accelerate_fsdp or own_fsdp or deepspeed
    fit_error = cfg.rosa.quant_error_rank and quantized and not is_prequantized(model_path)
    originals = OriginalWeights(model_path, cfg.model_dtype) if fit_error else None
    apply_rosa(model, cfg.rosa, split=not split_after_prepare, originals=originals)
    if deepspeed:
        _zero3_leaves(model, cfg.zero3_leaf_layers,
                      accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}))
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
        enable_checkpointing(model)
    compiled = _compile_layers(cfg, model, device, quantized=quantized, deepspeed=deepspeed,
                               accelerate_fsdp=accelerate_fsdp)
    if own_fsdp:
        from .engines.fsdp2 import shard_model

        if accelerator.num_processes < 2:
            raise ConfigError("fsdp: true needs a launch of 2 or more processes (torchrun or accelerate launch)")

        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        factor_numbers = sum(p.numel() for p in adapter_parameters(model))
        shard_model(model, param_dtype=low, reduce_dtype=torch.float32 if low else None,
                    replicate_factors=factors_replicated(cfg, factor_numbers))
        if streamed:
            fill(model, model_path, device)
    return Prepared(model, compiled, quantized, own_fsdp, split_after_prepare)


def _refuse_whole_model_beyond_gpu(model, device: torch.device) -> None:
    """accelerate's FSDP plugin shards a model that is already whole on each GPU: say so in one line,
    with the launch that reads only each rank's shards, instead of running out of memory."""
    if device.type != "cuda":
        return
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise ConfigError(f"the whole model ({need / 2**30:.1f} GiB) would sit on each GPU ({free / 2**30:.1f} GiB "
                          "free) before accelerate's FSDP plugin shards it: launch with launch/local.sh, "
                          "launch/multinode.sh or torchrun with --fsdp true, which read each rank's shards only")


def _compile_layers(cfg: TrainConfig, model, device: torch.device, *, quantized: bool, deepspeed: bool,
                    accelerate_fsdp: bool) -> int:
    """How many decoder layers ``cfg.compile`` compiled (before any sharding): ``auto`` compiles on a
    CUDA device with a plain base, one process, DDP or ``fsdp: true`` (measured on H200s; DeepSpeed and
    accelerate's FSDP plugin not yet), and skips silently where it cannot."""
    if cfg.compile is False:
        return 0
    if cfg.compile == "auto" and (device.type != "cuda" or quantized or deepspeed or accelerate_fsdp
                                  or compile_unavailable(device) or not find_decoder_layers(model)):
        return 0
    return compile_decoder_layers(model, device)


def refuse_quantized_engine(cfg: TrainConfig, accelerate_fsdp: bool, deepspeed: bool) -> None:
    """A quantized base or an 8-bit optimizer where the engine cannot hold them: one line, before loading."""
    if deepspeed and cfg.rosa.quantize != "none":
        raise ConfigError(f"config key 'rosa.quantize' ({cfg.rosa.quantize}) is not supported under DeepSpeed ZeRO-3 "
                          "(it partitions every weight, the packed 4-bit codes included): use FSDP2 "
                          "(fsdp: true), DDP or one process")
    if deepspeed and cfg.optimizer != "adamw":
        raise ConfigError(f"config key 'optimizer' {cfg.optimizer!r} is not supported under DeepSpeed ZeRO-3 (it "
                          "steps flat fp32 partitions): use optimizer 'adamw'")
    if accelerate_fsdp and cfg.rosa.quantize != "none":
        raise ConfigError(f"config key 'rosa.quantize' ({cfg.rosa.quantize}) is not supported with accelerate's FSDP "
                          "plugin, which would shard the packed 4-bit codes: launch without an FSDP config and "
                          "set fsdp: true (the quantized base stays whole on each process)")


def _zero3_leaves(model, decoder_layers: bool, zero_config: dict) -> None:
    """ZeRO-3 fetches a whole decoder layer at once instead of hooking each of its modules (measured
    1.8x faster on a Llama-3-8B shape), if ``decoder_layers``; DeepSpeed may also pick leaf modules
    itself (``stage3_module_granularity_threshold``). A leaf's weights are fetched again in backward
    only when its input requires grad, so in either case the embedding output is made to require it.

    DeepSpeed fetches leaves on its fast path (no per-parameter stream dependencies, buffers reused)
    only when that threshold is above 0 (1.13x on 2 H200s); for named leaves it is set to 1, a value
    under every module's granularity, so DeepSpeed adds no leaves of its own. ``zero_config`` is the
    dict DeepSpeed is initialized with, and a threshold the user set is kept."""
    from deepspeed.utils import logger, set_z3_leaf_modules

    classes = list({type(m) for m in find_decoder_layers(model)}) if decoder_layers else []
    if classes:
        set_z3_leaf_modules(model, classes)
        zero_config.setdefault("stage3_module_granularity_threshold", 1)
        logger.addFilter(_not_granularity_warning)  # the same function each time: added once
    threshold = zero_config.get("stage3_module_granularity_threshold")
    if classes or (isinstance(threshold, (int, float)) and threshold > 0):
        model.enable_input_require_grads()


def _not_granularity_warning(record) -> bool:
    """DeepSpeed warns that a threshold of 1 picks no module; that is the intent here."""
    return not record.getMessage().startswith("The smallest module granularity")


def zero3_fast_leaf_fetch(model) -> bool | None:
    """Whether DeepSpeed fetches leaf modules on its fast path (None when not under ZeRO-3)."""
    offload = getattr(getattr(model, "optimizer", None), "parameter_offload", None)
    return getattr(offload, "fast_sharding_for_leaf_module", None)
