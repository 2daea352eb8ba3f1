"""Load a model with exactly ROSA's target layers quantized by bitsandbytes, tensor by tensor.

transformers quantizes each weight as it reads it (``BitsAndBytesConfig``), so the model never
exists whole in bf16, on the GPU or in host memory: a 70B model loads as its ~37 GB of NF4 codes.
The codes are those ``rosa_scale.quant.quantize_linear`` gives (the same bitsandbytes call: block 64,
double quantization for 4-bit, compute in the model's dtype; int8 without fp16 weights, threshold
6.0), and every linear layer ROSA does not target (the LM head, excluded modules) stays in the
model's dtype, so merging gives a plain model again.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .config import RosaConfig
from .layer import is_linear
from .loading import DTYPES, ModelLoadError, _load, attention
from .model import find_target_modules
from .quant import bitsandbytes


def bnb_config(rosa: RosaConfig, path: str, dtype: str):
    """The ``BitsAndBytesConfig`` that quantizes ``rosa``'s targets of the model at ``path`` and nothing else."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    bitsandbytes()  # one line if it is missing
    config = _load(AutoConfig, path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    targets = set(find_target_modules(skeleton, rosa))
    keep = [n for n, m in skeleton.named_modules() if is_linear(m) and n not in targets]
    if rosa.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=rosa.quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[dtype], llm_int8_skip_modules=keep)


def is_prequantized(path: str) -> bool:
    """The model at ``path`` was saved quantized (its config carries a ``quantization_config``)."""
    from transformers import AutoConfig

    return getattr(_load(AutoConfig, path), "quantization_config", None) is not None


def load_quantized_model(path: str, dtype: str, rosa: RosaConfig, device: torch.device,
                         attn_implementation: str | None = None):
    """The model at ``path`` in ``dtype`` on ``device``, its ROSA targets quantized as ``rosa.quantize``
    says, or as saved for a model stored quantized (``rosa.quantize`` must then be 'none' or the same:
    ``apply_rosa`` checks it). Loaded straight to ``device``: a quantized model cannot be moved later."""
    from transformers import AutoModelForCausalLM

    extra = {} if is_prequantized(path) else {"quantization_config": bnb_config(rosa, path, dtype)}
    return _load(AutoModelForCausalLM, path, dtype=DTYPES[dtype], device_map={"": device}, **extra,
                 **attention(attn_implementation))


class OriginalWeights(Mapping):
    """Target name -> its weight in the folder at ``path`` (in ``dtype``, on the CPU), read from the
    safetensors files one tensor at a time when asked: the originals ``rosa.quant_error_rank`` fits
    the quantization error of, for a model that ``load_quantized_model`` quantized while loading."""

    def __init__(self, path: str, dtype: str):
        from safetensors import safe_open

        self._dtype, self._files = DTYPES[dtype], {}
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                self._files.update({key: file for key in f.keys()})

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = f"{name}.weight"
        if key not in self._files:
            raise ModelLoadError(f"the model folder has no tensor {key!r} to fit rosa.quant_error_rank to")
        with safe_open(str(self._files[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key).to(self._dtype)

    def __iter__(self):
        return (key.removesuffix(".weight") for key in self._files if key.endswith(".weight"))

    def __len__(self) -> int:
        return sum(1 for _ in self)
