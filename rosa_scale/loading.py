"""Load a causal LM and its tokenizer from a folder, a hub name, or a built-in name."""
from __future__ import annotations

from pathlib import Path

import torch

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names it."""


def resolve_model_path(spec: str) -> str:
    """A folder or hub name as given; a built-in name built (once) into the local cache."""
    if spec == BUILTIN_SMOLLM2:
        from .builtin import smollm2_dir

        return str(smollm2_dir())
    if spec.startswith("builtin:"):
        raise ModelLoadError(f"unknown built-in model {spec!r}; the built-in one is {BUILTIN_SMOLLM2!r}")
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
        raise ModelLoadError(f"model path not found: {spec}")
    return str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec


def _load(what, path: str, **kwargs):
    try:
        return what.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load model {path!r}: {first}") from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, path)


def attention(attn_implementation: str | None) -> dict:
    """The ``attn_implementation`` keyword for transformers' loaders: none where the model's default stands."""
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def load_model(path: str, dtype: str = "float32", attn_implementation: str | None = None):
    """Every process must call this together: under DeepSpeed ZeRO-3, transformers partitions
    the weights while loading (a collective)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path, dtype=DTYPES[dtype], **attention(attn_implementation))
