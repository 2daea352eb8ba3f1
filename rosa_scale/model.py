"""apply_rosa / rosa_layers / merge_rosa: put ROSA factors into a model and take them out again.

``apply_rosa`` wraps the targeted linear layers in ``RosaLinear``, freezes everything else and
(by default) makes the first split, so the model computes exactly what it did. ``merge_rosa``
folds the factors back and returns the original architecture with plain weights.
With ``RosaConfig(quantize=...)`` the targeted layers are quantized here (``rosa_scale.quant``);
targets already quantized (a model loaded with ``BitsAndBytesConfig``) are kept as the frozen base.
Merging gives plain ``nn.Linear`` layers again, dequantized, in the dtype they had before.
"""
from __future__ import annotations

from collections.abc import Mapping
import re
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .config import RosaConfig, validate_rosa
from .engines import engine_for
from .layer import RosaLinear, is_linear, linear_shape, resolve_rank
from .shared_input import group_shared_inputs
from .quant import (QuantRosaLinear, check_target, forget_quantization, ignore_in_ddp, is_quantized_linear,
                    wrap_quantized)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RosaState:
    """Kept on the model: the config and the index of the latest split (0 = the first)."""

    config: RosaConfig
    split_index: int
    requires_grad: dict[str, bool]


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _tied_weight_names(model: nn.Module) -> set[str]:
    """Names of modules whose weight is shared with another parameter (e.g. tied LM head)."""
    seen: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(pname)
    tied = set()
    for names in seen.values():
        if len(names) > 1:
            tied.update(n.rsplit(".", 1)[0] for n in names if n.endswith(".weight"))
    return tied


def find_target_modules(model: nn.Module, config: RosaConfig) -> list[str]:
    """Full names of the linear layers ``config`` targets, in model order; errors name the problem."""
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if is_linear(m)]
    kind = type(model).__name__
    examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear})[:12]) or "none"
    target = config.target_modules
    if target == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in linear if modules[n] is not head and not _is_router(model, modules[n])]
        _say_what_stays_frozen(model, modules, linear, names, head)
    elif isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as err:
            raise ValueError(f"target_modules {target!r} is not a valid regular expression: {err}") from None
        names = [n for n in linear if pattern.fullmatch(n)]
        if not names:
            raise ValueError(f"target_modules {target!r} matches no linear layer in {kind} (layers are named like: {examples})")
    else:
        for key in target:
            if not any(_matches(n, key) for n in modules):
                raise ValueError(f"target module {key!r} not found in {kind} (linear layers are named like: {examples})")
            bad = [n for n in modules if _matches(n, key) and not is_linear(modules[n])]
            if bad:
                experts = " (mixture-of-experts weights stored as one tensor per layer cannot be adapted)" \
                    if _holds_experts(modules[bad[0]]) else ""
                raise ValueError(f"target module {bad[0]!r} is a {type(modules[bad[0]]).__name__}, not a linear "
                                 f"layer{experts}")
        names = [n for n in linear if any(_matches(n, key) for key in target)]
    names = [n for n in names if not any(_matches(n, key) for key in config.exclude_modules)]
    if not names:
        raise ValueError(f"no linear layer of {kind} is left to adapt after exclude_modules")
    tied = _tied_weight_names(model)
    for n in names:
        if n in tied:
            raise ValueError(f"target module {n!r} shares its weight with another module (tied embeddings); "
                             "ROSA cannot split a shared weight: exclude it")
    return names


def _experts(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                 if isinstance(getattr(config, k, None), int)), None)


def _is_router(model: nn.Module, layer: nn.Module) -> bool:
    """A mixture-of-experts router or gate: a linear layer out to one score per expert, or to one
    scalar. Too narrow for any window, and not what fine-tuning should move."""
    experts = _experts(model)
    return experts is not None and linear_shape(layer)[0] in (1, experts)


def _holds_experts(module: nn.Module) -> bool:
    """Expert weights kept as 3-D tensors (transformers' fused MoE blocks), which ROSA cannot split."""
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def _say_what_stays_frozen(model, modules: dict, linear: list[str], names: list[str], head) -> None:
    """all-linear on a mixture-of-experts model: name what is not adapted, once, as a warning."""
    routers = [n for n in linear if n not in names and modules[n] is not head]
    experts = [n for n, m in modules.items() if _holds_experts(m)]
    if experts:
        warnings.warn(f"{len(experts)} mixture-of-experts blocks (e.g. {experts[0]}) hold their weights as 3-D "
                      "tensors and stay frozen: ROSA adapts linear layers (attention, shared experts)", stacklevel=3)
    if routers:
        warnings.warn(f"{len(routers)} router/gate layers (e.g. {routers[0]}) stay frozen", stacklevel=3)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def rosa_layers(model: nn.Module) -> dict[str, RosaLinear]:
    """Every RosaLinear of the model by its name (the name the wrapped layer had)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RosaLinear)}


def rosa_state(model: nn.Module) -> RosaState:
    state = getattr(model, "rosa_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no ROSA layers: call apply_rosa first")
    return state


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable ROSA factors, in a fixed order (up, down per layer)."""
    return [p for layer in rosa_layers(model).values() for p in (layer.up, layer.down)]


def apply_rosa(model: nn.Module, config: RosaConfig | None = None, *, split: bool = True,
               originals: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Wrap the targeted layers of ``model`` in place and freeze every other parameter.

    With ``split=True`` the first split (index 0) is made here; under DDP every process must
    call this together (each matrix is factorized once, by its owner rank). Sharded setups
    pass ``split=False`` and make the first split after sharding with ``resample(..., index=0)``.
    ``originals`` (target name -> weight before quantization) serves ``quant_error_rank`` for a model
    loaded already quantized; a weight is read when its layer is wrapped.
    """
    config = replace(config) if config is not None else RosaConfig()
    validate_rosa(config)
    if getattr(model, "rosa_state", None) is not None:
        raise ValueError("apply_rosa was already applied to this model")
    names = find_target_modules(model, config)
    ranks = {n: resolve_rank(config.rank, *linear_shape(model.get_submodule(n))) for n in names}
    for n in names:
        check_target(n, model.get_submodule(n), config)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    model_dtype = getattr(embeddings, "weight", torch.empty(0, dtype=torch.bfloat16)).dtype
    for n in names:
        layer, dtype = model.get_submodule(n), _DTYPES[config.adapter_dtype]
        if config.quantize != "none" or is_quantized_linear(layer):  # a base quantized here or at loading
            original = originals[n] if originals is not None and config.quant_error_rank else None
            wrapped = wrap_quantized(layer, ranks[n], config, dtype, model_dtype, original)
        else:
            wrapped = RosaLinear(layer, ranks[n], dtype)
            wrapped.fused = wrapped.fused and config.fused
        _set_submodule(model, n, wrapped)
    if config.fused:
        group_shared_inputs({n: m for n, m in rosa_layers(model).items() if not isinstance(m, QuantRosaLinear)},
                            config.shared_inputs)
    if any(isinstance(layer, QuantRosaLinear) for layer in rosa_layers(model).values()):
        ignore_in_ddp(model)
    if config.fixed_dtype == "float32":  # before any optimizer or sharding holds the parameter
        for layer in rosa_layers(model).values():
            if not isinstance(layer, QuantRosaLinear):
                layer.weight_param.data = layer.weight_param.data.float()
    model.rosa_state = RosaState(config=config, split_index=0, requires_grad=requires_grad)
    if split:
        engine_for(model).resplit(model, rosa_layers(model), 0, config)
    return model


@torch.no_grad()
def merge_rosa(model: nn.Module) -> nn.Module:
    """Fold every ``up @ down`` into its weight and unwrap: the original architecture again.

    A quantized layer becomes a plain ``nn.Linear`` holding ``deq(Q0) + S + up @ down - up0 @ down0``
    in the dtype its weight had before ``apply_rosa`` quantized it (bf16 for a model loaded in bf16).
    """
    state = rosa_state(model)
    quantized = any(isinstance(layer, QuantRosaLinear) for layer in rosa_layers(model).values())
    if quantized:
        ignore_in_ddp(model, undo=True)
    for name, layer in rosa_layers(model).items():
        if isinstance(layer, QuantRosaLinear):  # a plain nn.Linear in the layer's dtype before quantization
            _set_submodule(model, name, layer.to_plain())
            continue
        w = layer.merged_weight()
        weight = layer.base.weight
        weight.copy_((w.T if layer.transposed else w).to(weight.dtype))
        _set_submodule(model, name, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    del model.rosa_state
    if quantized:
        forget_quantization(model)
    return model
