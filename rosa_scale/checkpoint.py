"""Sharded checkpoints and exact resume for rosa-train, atomic on disk.

A checkpoint is ``<output_dir>/checkpoints/step-00000120/``:
- ``state/``: model and optimizer through torch.distributed.checkpoint (one file per rank; FSDP2
  shards, DDP or one process), or ``deepspeed/``: DeepSpeed ZeRO-3's own checkpoint;
- ``trainer_state.json``: step, data position, resample counter, scheduler, the resolved config,
  the ROSA layers and the rosa_scale version; ``model/``: the model's config and tokenizer;
- ``rng/rank-NNNNN.pt``: every rank's random-number generator states.
Everything is written into a temporary sibling and renamed into place by rank 0 after all ranks
finished; ``checkpoints/latest`` (the newest complete checkpoint's name) is replaced last.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .engines.local import world
from .model import rosa_layers, rosa_state

FOLDER = "checkpoints"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the problem."""


def _rank() -> int:
    return world()[1]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_name(name: str) -> str:
    if not (dist.is_available() and dist.is_initialized()):
        return name
    box = [name]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(output_dir: str | Path, step: int, *, model, module, optimizer, tokenizer,
                    trainer_state: dict, keep_last: int | None = None) -> Path:
    """Save everything needed to continue exactly; every process must call it.

    ``model`` is what training steps (a DeepSpeed engine, or the module), ``module`` the plain
    model inside, ``optimizer`` the torch optimizer. Returns the checkpoint folder.
    """
    root = Path(output_dir) / FOLDER
    final = root / checkpoint_name(step)
    tmp = root / _broadcast_name(f".{final.name}.tmp-{os.getpid()}")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    layers = rosa_layers(module)
    state = {
        **trainer_state, "step": step, "split_index": rosa_state(module).split_index,
        "world_size": world()[0],
        "rosa_layers": {n: {"transposed": l.transposed, "rank": l.rank} for n, l in layers.items()},
    }
    if _is_deepspeed(model):
        state["format"] = "deepspeed"
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        state["format"] = "dcp"
        model_sd, optim_sd = get_state_dict(module, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    torch.save(_rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    _barrier()
    if rank == 0:
        from . import __version__

        state["rosa_scale_version"] = __version__
        module.config.save_pretrained(tmp / "model")
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp-{os.getpid()}"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        if keep_last:
            prune(root, keep_last)
    _barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (never the one ``latest`` names)."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """``auto``: the newest complete checkpoint of ``output_dir`` (None if there is none yet);
    otherwise a checkpoint folder, a ``checkpoints`` folder or a run folder."""
    if spec == "auto":
        pointer = Path(output_dir) / FOLDER / LATEST
        return Path(output_dir) / FOLDER / pointer.read_text().strip() if pointer.exists() else None
    path = Path(spec)
    for candidate in (path, path / FOLDER):
        if (candidate / LATEST).is_file():
            path = candidate / (candidate / LATEST).read_text().strip()
            break
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"not a complete checkpoint (no trainer_state.json): {spec}")
    return path


def load_checkpoint(path: Path, *, model, module, optimizer, expect: dict) -> dict:
    """Restore model, optimizer, resample counter and RNG from ``path``; returns its trainer state.

    ``expect`` holds facts the checkpoint must match (engine, world size: the data position is
    counted per process, so an exact resume needs the same number of processes).
    """
    state = json.loads((path / "trainer_state.json").read_text())
    layers = {n: {"transposed": l.transposed, "rank": l.rank} for n, l in rosa_layers(module).items()}
    if state.get("rosa_layers") != layers:
        raise CheckpointError(f"checkpoint {path} was written for other ROSA layers or ranks than this run's model")
    for key, value in expect.items():
        if state.get(key) != value:
            raise CheckpointError(f"checkpoint {path} has {key}={state.get(key)!r}, this run has {value!r}")
    if state["format"] == "deepspeed":
        if not _is_deepspeed(model):
            raise CheckpointError(f"checkpoint {path} was written by DeepSpeed; launch with the same DeepSpeed config")
        model.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                              load_lr_scheduler_states=False)
    else:
        if _is_deepspeed(model):
            raise CheckpointError(f"checkpoint {path} was not written by DeepSpeed; it cannot resume a ZeRO-3 run")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        holder = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(holder, checkpoint_id=str(path / "state"),
                     no_dist=not (dist.is_available() and dist.is_initialized()))
        except Exception as err:  # DCP raises several kinds for missing or foreign files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
        set_state_dict(module, optimizer, model_state_dict=holder["model"], optim_state_dict=holder["optim"])
    rosa_state(module).split_index = state["split_index"]
    rng = path / "rng" / f"rank-{_rank():05d}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state
