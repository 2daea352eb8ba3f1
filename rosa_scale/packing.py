"""Several documents in one block without one attending to another.

A block holds documents one after another; its ``position_ids`` restart at 0 where each document
starts. transformers' masking utilities (``create_causal_mask``, used by the models' sdpa and eager
attention) read a restart as a document boundary when no attention mask is given and build a
block-diagonal causal mask, so every token sees only its own document, at the positions it would
have alone. Models whose attention does not build its mask there would let documents see each
other: they get one document per block, padded, instead (``packing: auto``).
"""
from __future__ import annotations

import sys

from .data_checks import DataError
from .loading import attention

IGNORE = -100
MODES = ("auto", "documents", "padded", "concatenated")
SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")  # their masks come from create_causal_mask


class _Seen(Exception):
    """Raised by the probe's mask builder: the model got that far, the rest of its forward is not needed."""


def keeps_documents_apart(config) -> bool:
    """Whether the causal LM ``config`` describes hands its position ids to transformers' mask builder
    (``create_causal_mask`` or the sliding-window one), which then keeps packed documents apart.

    Asked of the model itself, not of a list: it is built on the meta device (no memory, no weights)
    and run up to its mask builder, which is replaced for the call by one that notes the arguments
    and stops the forward. Attention other than sdpa/eager, a model that never calls the builder or
    one that fails to run on the meta device counts as no."""
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(config, "_attn_implementation_internal", None) not in (None, *SUPPORTED_ATTENTION):
        return False
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
        with torch.device("meta"):  # the class itself: from_config would partition under DeepSpeed ZeRO-3 (a collective)
            model = cls(config)
    except Exception:  # no causal-LM class for this config
        return False
    module = sys.modules[type(model.get_decoder()).__module__]
    seen = []

    def probe(*args, **kwargs):
        seen.append(kwargs.get("position_ids") is not None)
        raise _Seen

    names = [n for n in ("create_causal_mask", "create_sliding_window_causal_mask") if hasattr(module, n)]
    saved = {n: getattr(module, n) for n in names}
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    try:
        for n in names:
            setattr(module, n, probe)
        model(input_ids=ids, position_ids=ids, use_cache=False)
    except _Seen:
        pass
    except Exception:  # the forward does not run on the meta device: no answer, so no
        return False
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)
    return bool(seen) and all(seen)


def resolve_mode(mode: str, model_path: str | None, *, plain_text: bool, attn_implementation: str | None = None) -> str:
    """``documents``, ``padded`` or ``concatenated`` for a run: ``auto`` asks the model's class;
    ``documents`` for a model that cannot keep documents apart, or ``concatenated`` with chat data,
    is one ``DataError`` line."""
    if mode not in MODES:
        raise DataError(f"packing must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "concatenated" and not plain_text:
        raise DataError("packing 'concatenated' joins plain text only: chat and instruction examples are kept "
                        "apart ('auto', 'documents' or 'padded')")
    if mode in ("auto", "documents"):
        from transformers import AutoConfig

        if model_path is None:
            raise ValueError(f"packing {mode!r} asks the model whether it keeps documents apart: give its path")
        config = AutoConfig.from_pretrained(model_path, **attention(attn_implementation))
        if not keeps_documents_apart(config):
            if mode == "documents":
                what = f"{config.model_type} with {attn_implementation}" if attn_implementation else config.model_type
                raise DataError(f"packing 'documents' needs a model whose attention keeps packed documents apart "
                                f"({what} does not): use 'padded'")
            return "padded"
    return "documents" if mode == "auto" else mode


def document_positions(ids: list[int], eos: int) -> list[int]:
    """Position ids of a block of documents each ending in ``eos``: 0 at the block's start and after each ``eos``."""
    out, position = [], 0
    for token in ids:
        out.append(position)
        position = 0 if token == eos else position + 1
    return out


def pack_examples(examples: list[tuple[list[int], list[int]]], block_size: int, pad: int) -> dict[str, list]:
    """Examples (ids, labels), each at most ``block_size`` long, into blocks in their order: an example
    that does not fit in what is left of a block starts the next one. The rest of a block is padding
    (labels -100) with positions of its own, so no example sees it; no example's first token is a target."""
    out = {"input_ids": [], "labels": [], "position_ids": []}
    ids, labels, positions = [], [], []

    def close():
        fill = block_size - len(ids)
        out["input_ids"].append(ids + [pad] * fill)
        out["labels"].append(labels + [IGNORE] * fill)
        out["position_ids"].append(positions + list(range(fill)))

    for example_ids, example_labels in examples:
        if ids and len(ids) + len(example_ids) > block_size:
            close()
            ids, labels, positions = [], [], []
        # an example's first token is never predicted: nothing of its own comes before it
        ids, labels = ids + example_ids, labels + [IGNORE] + example_labels[1:]
        positions += list(range(len(example_ids)))
    if ids:
        close()
    return out
