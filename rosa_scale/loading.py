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


def load_model_and_tokenizer(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load model {path!r}: {first}") from None
    return model, tokenizer
