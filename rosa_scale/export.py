"""Write a merged model as an ordinary Hugging Face folder, atomically (temp folder, then rename)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_hf_folder(model, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` into a sibling temp folder, then swap it in: a reader never sees half a model."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
