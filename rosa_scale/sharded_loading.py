"""FSDP2 runs from a model folder without the whole model in any process's memory.

``from_pretrained`` on every rank holds the whole model in each process before ``fully_shard``
splits it: 16 GB per rank for an 8B model in bf16, 141 GB for a 70B one, more than a node's
host memory on 2 ranks. Here the model is built with its parameters on the meta device (buffers
such as rotary frequencies computed for real, as small as they are), ROSA-wrapped and sharded while
empty, given memory for its own shards only, and filled from the folder's safetensors files one
tensor at a time: each rank reads a tensor, keeps its shard, drops the rest. A process's host memory
then holds one tensor (the largest is the embedding: 2 GB at 70B) and the pages of the file being
read, whatever the model's size. The values are the folder's, bit for bit, as ``from_pretrained``
gives them: the run is the same as one loaded whole.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .loading import DTYPES, ModelLoadError, _load, attention
from .model import rosa_layers


def can_stream(path: str) -> bool:
    """A local folder of safetensors weights, not saved quantized: what ``empty_model`` + ``fill`` read."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return False
    from transformers import AutoConfig

    return getattr(_load(AutoConfig, path), "quantization_config", None) is None


def empty_model(path: str, dtype: str, attn_implementation: str | None = None) -> nn.Module:
    """The model of folder ``path`` with every parameter on the meta device (no memory) and its
    buffers computed on the CPU, in ``dtype``; its generation config read as ``from_pretrained`` would."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = _load(AutoConfig, path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], **attention(attn_implementation))
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _sources(model: nn.Module) -> dict[str, str]:
    """Checkpoint key -> the model's parameter name: a ROSA layer's frozen base sits under ``base.``
    where the checkpoint (written before ROSA) has the layer's own name."""
    wrapped = set(rosa_layers(model))
    names = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base") and owner[:-len(".base")] in wrapped:
            names[f"{owner[:-len('.base')]}.{leaf}"] = name
        elif owner not in wrapped:
            names[name] = name
    return names


@torch.no_grad()
def fill(model: nn.Module, path: str, device: torch.device) -> None:
    """Allocate ``model``'s (sharded) parameters on ``device`` and read them from the safetensors files
    of ``path``, one tensor at a time, each rank keeping its shard; the ROSA factors start at zero (the
    first split makes them). Call after ``shard_model``, before the first ``resample``. Every parameter
    the model has must be in the files (tied ones once), else one ``ModelLoadError`` line names it."""
    from safetensors import safe_open

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    if any(b.is_meta for b in buffers.values()):
        raise ModelLoadError("the model's buffers were not computed: build it with empty_model")
    model.to_empty(device=device)
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    params = dict(model.named_parameters(remove_duplicate=False))
    for layer in rosa_layers(model).values():
        for factor in (layer.up, layer.down):
            _local(factor).zero_()
    sources, filled = _sources(model), set()
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in sources:
                    kind = type(model).__name__.removeprefix("FSDP")  # fully_shard's subclass of the model's
                    raise ModelLoadError(f"{file.name} holds {key!r}, which {kind} has no "
                                         "parameter for (it cannot be read tensor by tensor)")
                param = params[sources[key]]
                _write_full(param, f.get_tensor(key).to(device, param.dtype))
                filled.add(id(param))
    missing = sorted(n for n, p in params.items() if id(p) not in filled and n in sources.values())
    if missing:
        raise ModelLoadError(f"{path} lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''})")


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _write_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """This rank's part of ``full`` into ``param`` (its DTensor shard, or the whole of a plain one)."""
    if tuple(full.shape) != tuple(param.shape):
        raise ModelLoadError(f"a tensor of shape {tuple(full.shape)} cannot fill a parameter of shape "
                             f"{tuple(param.shape)}")
    if isinstance(param, DTensor):  # every rank holds the full tensor: slice locally, no communication
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    _local(param).copy_(full)
