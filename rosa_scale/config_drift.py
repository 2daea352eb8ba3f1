"""Which config changes a resume may take: the run continues exactly, or the user said otherwise.

A resumed run restores the optimizer, scheduler, data position and random state of its checkpoint,
so a changed learning rate, seed or batch size would either be silently ignored or silently change
the results. Keys that only change what is observed or kept (evaluation, logging, save cadence,
paths, memory-saving recomputation) may change freely, and so may a longer run; any other change is
refused with one line naming each key and both values, unless the user names it in
``resume_override``.
"""
from __future__ import annotations

from typing import Any

from .config import ConfigError, TrainConfig, cli_fields, flat_keys, to_dict

# Keys that never change what is trained.
HARMLESS = {"eval_every", "max_eval_blocks", "log_every", "save_every", "keep_last", "output_dir", "resume",
            "save_merged", "overwrite_output_dir", "resume_override", "max_skipped_steps",
            "gradient_checkpointing", "zero3_leaf_layers", "loss_chunk_tokens", "report_to",
            "gc_every", "attn_implementation",
            "rosa.fused", "rosa.shared_inputs"}  # the same function, its GEMMs grouped otherwise


def _harmless(key: str, old: Any, new: Any, before: dict, now: dict) -> bool:
    if key in HARMLESS:
        return True
    if key == "max_steps":  # training longer continues the same run; the schedule stretches
        return isinstance(old, int) and isinstance(new, int) and new > old
    if key == "epochs":  # unused while max_steps is set; more epochs without it means a longer run
        return (now.get("max_steps") is not None and before.get("max_steps") is not None) or new > old
    if key == "fsdp_factors":  # where the factors live under rosa-train's FSDP2; nothing without it
        return not before.get("fsdp", False) and not now.get("fsdp", False)
    if key in ("eval_dataset", "eval_fraction"):  # the held-out set only, unless it was cut from the data
        return before.get("eval_dataset") is not None and now.get("eval_dataset") is not None
    return False


# Keys newer than some checkpoints, with the values that train as runs did before the key existed.
BEFORE_KEY = {"packing": ("concatenated", "padded"),  # plain text as one stream; chat one example per block
              "fsdp_factors": ("sharded",)}


def changed_keys(saved: dict, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every key whose change would alter the training; a key the
    checkpoint predates counts as changed unless its new value trains as runs did before it."""
    before, now = flat_keys(saved), flat_keys(to_dict(cfg))
    changed = [(k, before[k], now[k]) for k in now
               if k in before and before[k] != now[k] and not _harmless(k, before[k], now[k], before, now)]
    return changed + [(k, f"unset (then: {' or '.join(old)})", now[k]) for k, old in BEFORE_KEY.items()
                      if k not in before and now.get(k) not in old and not _harmless(k, None, now[k], before, now)]


def check_resume_config(saved: dict | None, cfg: TrainConfig, checkpoint: str) -> list[str]:
    """Raise ``ConfigError`` for changes not named in ``cfg.resume_override``; returns the overridden
    keys that did change (the run must then use their new values)."""
    known = {key for key, _, _ in cli_fields()}
    unknown = [k for k in cfg.resume_override if k not in known]
    if unknown:
        raise ConfigError(f"config key 'resume_override' names unknown keys: {', '.join(unknown)}")
    if not saved:
        return []
    changes = changed_keys(saved, cfg)
    refused = [(k, a, b) for k, a, b in changes if k not in cfg.resume_override]
    if refused:
        listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in refused)
        names = ", ".join(k for k, _, _ in refused)
        raise ConfigError(f"checkpoint {checkpoint} was trained with other settings ({listed}), which would change "
                          f"the training: resume with the checkpoint's values, or add --resume-override "
                          f"\"[{names}]\" to train on with the new ones")
    return [k for k, _, _ in changes]
