"""The merged model as an ordinary Hugging Face folder: full weights gathered, written atomically.

Works for every engine: under FSDP2 each tensor is gathered in turn (a collective, all ranks
call) and only rank 0 keeps the full copy, on the CPU.
"""
from __future__ import annotations

import copy
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .factorize import merge
from .model import rosa_layers
from .quant import QuantRosaLinear, drop_quantization_config


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


@contextmanager
def _gathered(tensors):
    """Whole values of ZeRO-3 partitioned parameters inside the block (a collective); others as they are."""
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def _tensor_at(model: nn.Module, key: str) -> torch.Tensor:
    try:
        return model.get_parameter(key)
    except AttributeError:
        return model.get_buffer(key)


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The state dict of the original architecture with ``w_fixed + up @ down`` folded in (for a
    quantized layer: ``deq(Q0) + S + up @ down - up0 @ down0``, as ``merge_rosa`` gives it).

    Every process must call it (FSDP2 and ZeRO-3 tensors are gathered one at a time); the
    dict, on the CPU, is returned on rank 0 (or without a process group) and None elsewhere.
    """
    keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    layers = rosa_layers(model)
    out = {}
    for key in model.state_dict():
        quantized = _quantized_entry(layers, key)
        if quantized is not None:  # a whole layer: one process or DDP, nothing to gather
            if keep and quantized[1] is not None:
                cast = dtype if dtype is not None else quantized[1].dtype
                out[quantized[0]] = quantized[1].to("cpu", cast)
            continue
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in ("up", "down"):
            continue
        wrapped = key[: -len(".base.weight")] if key.endswith(".base.weight") else None
        if wrapped in layers:
            layer = layers[wrapped]
            with _gathered([layer.weight_param, layer.up, layer.down]):
                full = _full(layer.weight_param)
                w = merge(full.T if layer.transposed else full, _full(layer.up), _full(layer.down))
                value = (w.T if layer.transposed else w).to(full.dtype)
            key = wrapped + ".weight"
        else:
            tensor = _tensor_at(model, key)
            with _gathered([tensor]):
                value = _full(tensor).clone()
            if ".base." in key and key.split(".base.")[0] in layers:
                key = key.replace(".base.", ".")
        if keep:
            cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
            out[key] = value.to("cpu", cast)
    return out if keep else None


def _quantized_entry(layers: dict, key: str) -> tuple[str, torch.Tensor | None] | None:
    """For a state-dict key inside a quantized ROSA layer: (plain key, merged value), or (key, None) for
    its parts the plain layer does not have (quantization state, factors, stack); None elsewhere."""
    owner = key.split(".base.")[0] if ".base." in key else key.rpartition(".")[0]
    layer = layers.get(owner)
    if not isinstance(layer, QuantRosaLinear):
        return None
    if key == owner + ".base.weight":
        return owner + ".weight", layer.merged_weight().to(layer.merge_dtype)
    if key == owner + ".base.bias":
        return owner + ".bias", layer.base.bias.detach().to(layer.merge_dtype)
    return key, None


def save_hf_folder(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` into a sibling temp folder, then swap it in: a reader never sees half a model."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def save_merged(model: nn.Module, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """Gather the merged weights (all ranks call) and write them on rank 0 as a plain HF folder.

    The folder is written from an empty skeleton of the original class, so no ROSA or FSDP
    wrapper leaks into it. Returns the folder on rank 0, None elsewhere.
    """
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    state = merged_state_dict(model, dtype)
    if state is None:
        return None
    # The plain class, built directly: from_config would start a (collective) ZeRO-3 init here.
    plain = next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    config = copy.deepcopy(model.config)
    drop_quantization_config(config)  # a quantized base merges into plain weights
    with torch.device("meta"):
        skeleton = plain(config)
    if getattr(model, "generation_config", None) is not None:
        skeleton.generation_config = model.generation_config
    return save_hf_folder(skeleton, tokenizer, out_dir, state_dict=state)
