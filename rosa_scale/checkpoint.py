"""Sharded checkpoints and exact resume for rosa-train, atomic on disk.

A checkpoint is ``<output_dir>/checkpoints/step-00000120/``:
- ``state/``: model and optimizer through torch.distributed.checkpoint (one file per rank; FSDP2
  shards, DDP or one process), or ``deepspeed/``: DeepSpeed ZeRO-3's own checkpoint;
- ``trainer_state.json``: step, data position, resample counter, scheduler, the resolved config,
  the ROSA layers and the rosa_scale version; ``model/``: the model's config and tokenizer;
- ``rng/rank-NNNNN.safetensors``: every rank's random-number generator states (tensors, and the
  Python and NumPy states as JSON in its metadata: nothing in a checkpoint is a pickle we load).
Everything is written into a temporary sibling and renamed into place by rank 0 after all ranks
finished; ``checkpoints/latest`` (the newest complete checkpoint's name) is replaced last. A save
that fails on any rank (a full disk) fails on every rank with one message and leaves no temporary
folder; folders left by a killed save are removed at the next save.
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
from .quant import QuantRosaLinear, fingerprint, quant_type_of

FOLDER = "checkpoints"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the problem."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed on some rank (a full disk, a lost mount); nothing was kept of it."""


# What every trainer_state.json must hold to resume from it.
REQUIRED_STATE = ("format", "step", "split_index", "world_size", "epoch", "batches_in_epoch", "resamples",
                  "eval_loss_before", "scheduler", "rosa_layers")


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


def _save_rng(path: Path) -> None:
    """This process's generator states as safetensors: tensors for torch and CUDA, JSON for Python's
    and NumPy's (so reading them back can never run code)."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    meta = {"python": json.dumps([version, list(internal), gauss])}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = json.dumps([name, int(pos), int(has_gauss), float(cached)])
    except ImportError:
        pass
    save_file(tensors, str(path), metadata=meta)


def _load_rng(path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        return _load_legacy_rng(path.with_suffix(".pt"))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        version, internal, gauss = json.loads(meta["python"])
        numpy_state = json.loads(meta["numpy"]) if "numpy" in meta else None
    except Exception as err:  # a truncated or foreign file raises several kinds
        raise CheckpointError(f"checkpoint corrupt: cannot read {path}: {_first_line(err)}") from None
    torch.set_rng_state(tensors["torch"])
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if numpy_state is not None and "numpy" in tensors:
        import numpy as np

        name, pos, has_gauss, cached = numpy_state
        np.random.set_state((name, tensors["numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


def _load_legacy_rng(path: Path) -> None:
    """The ``.pt`` generator states of checkpoints from rosa_scale 0.1, read with ``weights_only``:
    tensors, tuples and NumPy arrays only, never arbitrary objects."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint corrupt or unsafe: cannot read {path}: {_first_line(err)}") from None
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _param_names(module, optimizer) -> dict[int, str]:
    names = {id(p): n for n, p in module.named_parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)
    return {id(p): names[id(p)] for g in inner.param_groups for p in g["params"] if id(p) in names}


def _stateless(module, optimizer) -> list[str]:
    """Names of the optimizer's parameters that have no state yet (right after a resample reset).

    ``get_state_dict`` fills an empty optimizer state with a zero-learning-rate step, which would
    make Adam count one step too many; they are saved as such and emptied again after saving and
    after loading, so saving never changes the run."""
    inner = getattr(optimizer, "optimizer", optimizer)
    names = _param_names(module, optimizer)
    return sorted(names[id(p)] for g in inner.param_groups for p in g["params"]
                  if id(p) in names and not inner.state.get(p))


def _forget_state(module, optimizer, stateless: list[str]) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    names, wanted = _param_names(module, optimizer), set(stateless)
    for g in inner.param_groups:
        for p in g["params"]:
            if names.get(id(p)) in wanted:
                inner.state.pop(p, None)


def _agree_or_raise(error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed ``what``, and then all raise (one message)."""
    message = None if error is None else f"{what} failed: {_first_line(error)}"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        first = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
        if message is None and first is not None:
            message = f"on rank {first[0]}: {first[1]}"
    if message is not None:
        raise CheckpointWriteError(message)


def remove_leftovers(root: Path) -> None:
    """Temporary folders and pointers of saves that were killed midway (never a complete checkpoint)."""
    if not root.is_dir():
        return
    for junk in root.glob(".*.tmp-*"):
        if junk.is_dir() and not junk.is_symlink():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "trainer_state.json").is_file())


def save_checkpoint(output_dir: str | Path, step: int, *, model, module, optimizer, tokenizer,
                    trainer_state: dict, keep_last: int | None = None) -> Path:
    """Save everything needed to continue exactly; every process must call it.

    ``model`` is what training steps (a DeepSpeed engine, or the module), ``module`` the plain
    model inside, ``optimizer`` the torch optimizer. Returns the checkpoint folder. Saving changes
    nothing the run computes afterwards; a failure on any rank raises ``CheckpointWriteError`` on
    all of them and leaves nothing behind.
    """
    root = Path(output_dir) / FOLDER
    final = root / checkpoint_name(step)
    tmp = root / _broadcast_name(f".{final.name}.tmp-{os.getpid()}")
    rank = _rank()
    error = None
    if rank == 0:
        try:
            remove_leftovers(root)
            (tmp / "rng").mkdir(parents=True)
        except OSError as err:
            error = err
    try:
        _agree_or_raise(error, f"creating {tmp}")
        _write_parts(tmp, step, model, module, optimizer, tokenizer, trainer_state)
        error = None
        if rank == 0:
            try:
                _finish(tmp, final, root, keep_last)
            except OSError as err:
                error = err
        _agree_or_raise(error, f"finishing {final}")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_parts(tmp: Path, step: int, model, module, optimizer, tokenizer, trainer_state: dict) -> None:
    """Every rank writes its part (a collective); any rank's failure is raised on all ranks."""
    rank = _rank()
    layers = rosa_layers(module)
    state = {
        **trainer_state, "step": step, "split_index": rosa_state(module).split_index,
        "world_size": world()[0], "rosa_layers": _layer_records(layers),
    }
    quantized = {n: l for n, l in layers.items() if isinstance(l, QuantRosaLinear)}
    if quantized:
        state["stack_columns"] = {n: int(l.stack_up.shape[1]) for n, l in quantized.items()}
        state["base_fingerprints"] = {n: _fingerprint(l) for n, l in quantized.items()}
    error = None
    try:
        if _is_deepspeed(model):
            state["format"] = "deepspeed"
            model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            state["format"] = "dcp"
            state["stateless_params"] = _stateless(module, optimizer)
            model_sd, optim_sd = get_state_dict(module, optimizer)
            _forget_state(module, optimizer, state["stateless_params"])
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"),
                     no_dist=not (dist.is_available() and dist.is_initialized()))
        _save_rng(tmp / "rng" / f"rank-{rank:05d}.safetensors")
        if rank == 0:
            from . import __version__

            state["rosa_scale_version"] = __version__
            module.config.save_pretrained(tmp / "model")
            if getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(tmp / "model")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    except Exception as err:  # CheckpointException (DCP) is not an Exception: caught below
        error = err
    except BaseException as err:
        if type(err).__name__ != "CheckpointException":
            raise
        error = err
    _agree_or_raise(error, f"writing {tmp}")


def _finish(tmp: Path, final: Path, root: Path, keep_last: int | None) -> None:
    """Rank 0: the complete folder takes its name, then ``latest`` names it, then old ones go."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    if keep_last:
        prune(root, keep_last)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (never the one ``latest`` names);
    incomplete folders are neither counted nor kept."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    done = complete_checkpoints(root)
    for old in done[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """``auto``: the newest complete checkpoint of ``output_dir`` (None if there is none yet);
    otherwise a checkpoint folder, a ``checkpoints`` folder or a run folder."""
    if spec == "auto":
        pointer = Path(output_dir) / FOLDER / LATEST
        if not pointer.exists():
            return None
        path = pointer.parent / pointer.read_text().strip()
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint "
                                  "(no trainer_state.json): give --resume the path of another checkpoint")
        return path
    path = Path(spec)
    for candidate in (path, path / FOLDER):
        if (candidate / LATEST).is_file():
            path = candidate / (candidate / LATEST).read_text().strip()
            break
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"not a complete checkpoint (no trainer_state.json): {spec}")
    return path


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.json`` of checkpoint ``path``, with every key a resume needs."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint corrupt: cannot read {file}: {_first_line(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint corrupt: {file} is not a JSON object")
    missing = [k for k in REQUIRED_STATE if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint corrupt: {file} lacks {', '.join(missing)}")
    if state["format"] not in ("dcp", "deepspeed"):
        raise CheckpointError(f"checkpoint corrupt: {file} has format {state['format']!r}")
    return state


def load_checkpoint(path: Path, *, model, module, optimizer, expect: dict, state: dict | None = None) -> dict:
    """Restore model, optimizer, resample counter and RNG from ``path``; returns its trainer state.

    ``expect`` holds facts the checkpoint must match (engine, world size: the data position is
    counted per process, so an exact resume needs the same number of processes). ``state`` is its
    trainer state if already read.
    """
    state = read_trainer_state(path) if state is None else state
    layers = _layer_records(rosa_layers(module))
    if state.get("rosa_layers") != layers:
        raise CheckpointError(f"checkpoint {path} was written for other ROSA layers or ranks than this run's model")
    for key, value in expect.items():
        if state.get(key) != value:
            raise CheckpointError(f"checkpoint {path} has {key}={state.get(key)!r}, this run has {value!r}")
    rng = path / "rng" / f"rank-{_rank():05d}.safetensors"
    if not rng.is_file() and not rng.with_suffix(".pt").is_file():
        raise CheckpointError(f"checkpoint incomplete: {rng} is missing")
    if state["format"] == "deepspeed":
        if not _is_deepspeed(model):
            raise CheckpointError(f"checkpoint {path} was written by DeepSpeed; launch with the same DeepSpeed config")
        model.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                              load_lr_scheduler_states=False)
    else:
        if _is_deepspeed(model):
            raise CheckpointError(f"checkpoint {path} was not written by DeepSpeed; it cannot resume a ZeRO-3 run")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        stateless = set(state.get("stateless_params") or ())
        _size_stacks(module, state.get("stack_columns") or {}, path)
        _check_quantized_base(module, state.get("base_fingerprints") or {}, path)
        model_sd, optim_sd = get_state_dict(module, optimizer)
        for key in _quantized_base_keys(module, model_sd):  # never loaded: this run quantized the same base
            model_sd.pop(key)
        for name in stateless:  # saved as a placeholder: not read, emptied below
            optim_sd.get("state", {}).pop(name, None)
        holder = {"model": model_sd, "optim": optim_sd}
        _dcp_load(holder, path / "state")
        set_state_dict(module, optimizer, model_state_dict=holder["model"], optim_state_dict=holder["optim"],
                       options=StateDictOptions(strict=False))  # the frozen quantized base was checked, not loaded
        _forget_state(module, optimizer, sorted(stateless))
    rosa_state(module).split_index = state["split_index"]
    _load_rng(rng)
    return state


def _layer_records(layers: dict) -> dict:
    """What a checkpoint records of each ROSA layer (and a resume must find again): layout, rank, and
    for a quantized base its kind."""
    records = {}
    for name, layer in layers.items():
        records[name] = {"transposed": layer.transposed, "rank": layer.rank}
        if isinstance(layer, QuantRosaLinear):
            records[name]["quantize"] = quant_type_of(layer.base)
    return records


def _size_stacks(module, columns: dict[str, int], path: Path) -> None:
    """Give each quantized layer's stack the width it had when saved, so that the checkpoint's
    tensors load into it (the stack grows by 2 r columns at every resample)."""
    for name, layer in rosa_layers(module).items():
        if not isinstance(layer, QuantRosaLinear):
            continue
        if name not in columns:
            raise CheckpointError(f"checkpoint corrupt: {path / 'trainer_state.json'} lacks the stack width of {name}")
        width = int(columns[name])
        layer.stack_up = layer.stack_up.new_zeros(layer.out_features, width)
        layer.stack_down = layer.stack_down.new_zeros(width, layer.in_features)


def _fingerprint(layer: QuantRosaLinear) -> list[int]:
    """The base's checksums, computed once per process (the base is never written)."""
    if getattr(layer, "_base_fingerprint", None) is None:
        layer._base_fingerprint = fingerprint(layer.base)
    return layer._base_fingerprint


def _quantized_base_keys(module, model_sd: dict) -> list[str]:
    prefixes = tuple(f"{n}.base." for n, l in rosa_layers(module).items() if isinstance(l, QuantRosaLinear))
    return [k for k in model_sd if prefixes and k.startswith(prefixes)]


def _check_quantized_base(module, fingerprints: dict, path: Path) -> None:
    """A quantized base is quantized again from the original weights at every start, never loaded (its
    saved copy is for rosa-consolidate): it must be the one the checkpoint was trained on, else the run
    would continue on another base (changed weights, another bitsandbytes), and is refused."""
    for name, layer in rosa_layers(module).items():
        if isinstance(layer, QuantRosaLinear) and fingerprints.get(name) != _fingerprint(layer):
            raise CheckpointError(f"checkpoint {path} was trained on another quantized base: {name}.base differs "
                                  "from the one quantized from this run's model (other weights, or another "
                                  "bitsandbytes version)")


def _dcp_load(holder: dict, folder: Path) -> None:
    """DCP load through an allowlisting reader: no pickle in a checkpoint can run code; a damaged or
    refused file is one ``CheckpointError``-like line naming it, on every rank."""
    from .safe_load import dcp_load

    dcp_load(holder, folder, no_dist=not (dist.is_available() and dist.is_initialized()))
