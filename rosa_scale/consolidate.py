"""`rosa-consolidate`: a training checkpoint -> one merged Hugging Face model folder (safetensors).

    rosa-consolidate CKPT OUT [--dtype auto|float32|bfloat16|float16] [--max-shard-size 5GB] [--force]

CKPT is a checkpoint folder (``<output_dir>/checkpoints/step-00000120``), a ``checkpoints/``
folder or a run's output_dir (both mean the checkpoint named in ``checkpoints/latest``),
written by any engine: a ``torch.distributed.checkpoint`` folder (``state/``, 1 or N ranks) or
a DeepSpeed ZeRO-3 checkpoint (``deepspeed/state/``). OUT becomes an ordinary Hugging Face
folder that ``AutoModelForCausalLM.from_pretrained(OUT)`` loads without rosa_scale: the
original architecture's tensor names and shapes, every ROSA layer merged
(``w_fixed + up @ down`` in fp32, back in the layer's own layout), tied weights left out as
``save_pretrained`` leaves them, shards named and indexed as transformers names them.

Memory stays bounded whatever the model size, on one CPU machine, without a process group:
the shard layout is planned up front from the checkpoint's metadata (names, shapes, dtypes), so
each shard file's header is written first and every tensor is appended as soon as it is merged.
Only the sources of one output tensor (a ROSA layer's ``base.weight``, ``up`` and ``down``
together) plus its merged value are in memory at a time; neither a shard nor the model ever is.

Everything goes to a hidden sibling folder of OUT that is renamed into place at the end: on
any error nothing is left at OUT, and an existing OUT (replaced only with ``--force``) stays
as it was.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import struct
import sys
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .factorize import merge
from .layer import is_linear, linear_shape

PROG = "rosa-consolidate"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_FILE = "trainer_state.json"
MODEL_KEY = "model."  # the DCP state is {"model": model_state_dict, "optim": ...}, flattened
_READ_BATCH_BYTES = 64 << 20  # small tensors are read together, up to this many bytes per read
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class ConsolidateError(ValueError):
    """A checkpoint or output that cannot be used; the message names the problem."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _nbytes(shape, dtype: torch.dtype) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel * dtype.itemsize


# --------------------------------------------------------------------------- finding the checkpoint

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder; a ``checkpoints/`` folder or an output_dir give the one named in ``latest``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConsolidateError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise ConsolidateError(f"{path} is not a folder (give a checkpoint folder, a checkpoints/ folder or a run's output_dir)")
    if any((path / part).exists() for part in (STATE_FILE, "state", "deepspeed", "model")):
        return path
    for folder in (path, path / "checkpoints"):
        latest = folder / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            chosen = folder / name
            if not name or not chosen.is_dir():
                raise ConsolidateError(f"checkpoint not found: {chosen} (named in {latest})")
            return chosen
    if (path / "checkpoints").is_dir():
        raise ConsolidateError(f"no complete checkpoint in {path / 'checkpoints'} (it has no 'latest' file)")
    raise ConsolidateError(f"{path} is not a checkpoint: it has no {STATE_FILE}, and no checkpoints/latest")


def read_trainer_state(ckpt: Path) -> dict:
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise ConsolidateError(f"checkpoint incomplete: {path} is missing")
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConsolidateError(f"checkpoint incomplete or corrupt: cannot read {path}: {_first_line(err)}") from None
    if not isinstance(state, dict) or state.get("format") not in ("dcp", "deepspeed"):
        raise ConsolidateError(f"{path}: 'format' must be 'dcp' or 'deepspeed', got {state.get('format')!r}"
                               if isinstance(state, dict) else f"{path} is not a JSON object")
    return state


# --------------------------------------------------------------------------- reading tensors

class DcpReader:
    """The ``model.*`` tensors of a ``torch.distributed.checkpoint`` folder, loaded a few keys at a time.

    ``tensors`` maps each model tensor's name (without the ``model.`` prefix) to (shape, dtype);
    DCP reassembles any sharding (FSDP2 DTensor chunks from N ranks) into the full tensors asked for.
    """

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        if not (folder / ".metadata").is_file():
            raise ConsolidateError(f"checkpoint incomplete: {folder} has no DCP .metadata file")
        try:
            metadata = FileSystemReader(str(folder)).read_metadata()
        except Exception as err:  # a truncated pickle raises anything
            raise ConsolidateError(f"checkpoint incomplete or corrupt: cannot read {folder / '.metadata'}: "
                                   f"{_first_line(err)}") from None
        needed: dict[str, int] = {}  # every data file the metadata points into, and its least size
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            file = folder / name
            if not file.is_file():
                raise ConsolidateError(f"checkpoint incomplete: {file} is missing (the DCP metadata refers to it; "
                                       "was it written by a rank that did not finish?)")
            if file.stat().st_size < size:
                raise ConsolidateError(f"checkpoint incomplete: {file} is truncated "
                                       f"({file.stat().st_size} bytes, the metadata needs {size})")
        self.tensors = {key[len(MODEL_KEY):]: (tuple(md.size), md.properties.dtype)
                        for key, md in metadata.state_dict_metadata.items()
                        if key.startswith(MODEL_KEY) and isinstance(md, TensorStorageMetadata)}
        self.shared: dict[str, str] = {}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        state = {MODEL_KEY + n: torch.empty(self.tensors[n][0], dtype=self.tensors[n][1]) for n in names}
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled ...": no process group is the plan
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
                dcp.load(state, checkpoint_id=str(self.folder), no_dist=True)
        except Exception as err:
            raise ConsolidateError(f"cannot read {', '.join(names)} from {self.folder}: {_first_line(err)}") from None
        return {n: state[MODEL_KEY + n] for n in names}


# DeepSpeed's checkpoint keys (deepspeed.checkpoint.constants), named here so that a DCP checkpoint
# never imports deepspeed.
BUFFER_NAMES, PARAM_SHAPES, SHARED_PARAMS = "buffer_names", "param_shapes", "shared_params"
FROZEN_PARAM_SHAPES, FROZEN_PARAM_FRAGMENTS = "frozen_param_shapes", "frozen_param_fragments"
OPTIMIZER_STATE_DICT, FP32_FLAT_GROUPS = "optimizer_state_dict", "fp32_flat_groups"
ZERO_STAGE, PARTITION_COUNT = "zero_stage", "partition_count"


class ZeroReader:
    """The model tensors of a DeepSpeed ZeRO-3 checkpoint (``engine.save_checkpoint(dir, tag)``).

    Frozen parameters (``w_fixed``, embeddings, norms: nearly the whole model) come from the
    per-rank fragments in ``*_model_states.pt``; trainable ones (``up``, ``down``) from the fp32
    master partitions in ``*_optim_states.pt``, reassembled by DeepSpeed's own ``GatheredTensor``
    (``deepspeed.utils.zero_to_fp32``). That module's reader is not used whole: it ``torch.load``s
    every model-states file into memory and concatenates every frozen parameter up front, which
    holds the model twice. Here both kinds of file are memory-mapped and each tensor is copied out
    on demand; the maps are reopened after every ``reopen_bytes`` read, so the pages they keep
    resident stay bounded too.
    """

    reopen_bytes = 256 << 20

    def __init__(self, folder: Path, world_size: int | None):
        self.folder = folder
        if not folder.is_dir():
            raise ConsolidateError(f"checkpoint incomplete: {folder} (the DeepSpeed state) is missing")
        models = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
        optims = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
        if world_size is None:
            world_size = len(models)
        self.model_files = [folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
        self.optim_files = []
        for r in range(world_size):
            found = [p for p in optims if p.name.endswith(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")]
            self.optim_files.append(found[0] if len(found) == 1 else None)
        have = sum(p.is_file() for p in self.model_files), sum(p is not None for p in self.optim_files)
        if world_size < 1 or have != (world_size, world_size):
            raise ConsolidateError(f"checkpoint incomplete: {folder} has {have[0]} model-state and {have[1]} "
                                   f"optimizer-state rank files, the run had {world_size} ranks")
        self.world_size = world_size
        self._model_states = self._flat_groups = None
        self._open()
        first = self._model_states[0]
        if first.get(FROZEN_PARAM_FRAGMENTS) is None:
            raise ConsolidateError(f"{self.model_files[0]} holds no frozen parameters "
                                   "(saved with exclude_frozen_parameters?): the model cannot be rebuilt from it")
        buffer_names = set(first.get(BUFFER_NAMES) or ())
        self.buffers = {k: v.clone() for k, v in first["module"].items() if k in buffer_names}  # not the map's
        self.shared = dict(first.get(SHARED_PARAMS) or {})  # alias -> the name it is stored under
        self.tensors = {k: (tuple(shape), first[FROZEN_PARAM_FRAGMENTS][k].dtype)
                        for k, shape in (first.get(FROZEN_PARAM_SHAPES) or {}).items()}
        self.tensors.update({k: (tuple(v.shape), v.dtype) for k, v in self.buffers.items()})
        self._trainable: dict[str, tuple[int, int]] = {}  # name -> (offset, numel) of its partition on each rank
        offset = 0
        for group in first.get(PARAM_SHAPES) or ():
            for name, shape in group.items():
                part = -(-shape.numel() // world_size)
                self._trainable[name] = (offset, part)
                self.tensors[name] = (tuple(shape), torch.float32)  # the optimizer's fp32 master copy
                offset += part
        available = sum(t.numel() for t in self._flat_groups[0])
        if offset != available:
            raise ConsolidateError(f"checkpoint corrupt: {folder} holds {available} trainable fp32 values per rank, "
                                   f"its parameter shapes need {offset}")

    def _load(self, file: Path) -> dict:
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except Exception as err:
            raise ConsolidateError(f"checkpoint incomplete or corrupt: cannot read {file}: {_first_line(err)}") from None

    def _open(self) -> None:
        self._model_states = [self._load(f) for f in self.model_files]
        self._flat_groups = []
        for file in self.optim_files:
            state = self._load(file)[OPTIMIZER_STATE_DICT]
            stage, count = state.get(ZERO_STAGE), state.get(PARTITION_COUNT)
            count = max(count) if isinstance(count, list) else count
            if stage != 3:
                raise ConsolidateError(f"{file} is a ZeRO stage {stage} checkpoint; only ZeRO-3 checkpoints are supported")
            if count != self.world_size:
                raise ConsolidateError(f"checkpoint incomplete: {file} was written by one of {count} ranks, "
                                       f"{self.world_size} rank files are present")
            self._flat_groups.append(state[FP32_FLAT_GROUPS])
        self._group_offsets = [0]
        for t in self._flat_groups[0]:
            self._group_offsets.append(self._group_offsets[-1] + t.numel())
        self._read_since_open = 0

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import GatheredTensor

        if self._model_states is None:
            self._open()
        out = {}
        for name in names:
            shape = torch.Size(self.tensors[name][0])
            if name in self._trainable:
                offset, part = self._trainable[name]
                value = GatheredTensor(self._flat_groups, self._group_offsets, offset, part, shape).contiguous()
            elif name in self.buffers:
                value = self.buffers[name]
            else:
                fragments = [s[FROZEN_PARAM_FRAGMENTS][name].reshape(-1) for s in self._model_states]
                value = torch.cat(fragments).narrow(0, 0, shape.numel()).view(shape)
            out[name] = value
            self._read_since_open += value.nbytes
        if self._read_since_open >= self.reopen_bytes:  # drop the maps and the pages they hold
            self._model_states = self._flat_groups = None
            gc.collect()
        return out


# --------------------------------------------------------------------------- the model it names

def build_skeleton(model_dir: Path):
    """The model's config and its architecture on the meta device (no memory, no weights)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise ConsolidateError(f"checkpoint incomplete: {model_dir / 'config.json'} is missing")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(model_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            skeleton = cls(config) if isinstance(cls, type) else AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise ConsolidateError(f"cannot build the model of {model_dir / 'config.json'}: {_first_line(err)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return config, skeleton


def saved_tensors(skeleton) -> dict[str, torch.Tensor]:
    """The (meta) tensors the architecture's own ``save_pretrained`` writes, in its order."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = skeleton.state_dict()
    for key in skeleton._keys_to_ignore_on_save or ():
        state.pop(key, None)
    return remove_tied_weights_from_state_dict(state, skeleton)


def _check_no_conversion(skeleton, names) -> None:
    """transformers 5 may rename or fuse weights on load and revert that on save (e.g. MoE experts)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers: no conversions
        return
    probe = {n: torch.empty(0, device="meta") for n in names}
    if list(revert_weight_conversion(skeleton, probe)) != list(names):
        raise ConsolidateError(f"{type(skeleton).__name__} stores weights under other names than transformers saves "
                               "them (a load-time weight conversion); rosa-consolidate does not support it yet")


def _fp32_patterns(skeleton, dtype: torch.dtype):
    """Parameters ``from_pretrained`` keeps in fp32 at this dtype (``_keep_in_fp32_modules``): written in fp32."""
    try:
        from transformers.core_model_loading import build_glob_alternation

        plan = skeleton._get_dtype_plan(dtype)
        return build_glob_alternation(list(plan))[0] if plan else None
    except (ImportError, AttributeError):
        return None


@dataclass
class Item:
    """One tensor of the output: where it comes from and how it is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[str, ...]  # one tensor, or a ROSA layer's (base.weight, up, down)
    transposed: bool = False  # a Conv1D weight: stored (in, out), the factors are (out x r), (r x in)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


def _rank(info, up) -> int | None:
    """The recorded rank of a ROSA layer, else the one its stored ``up`` has."""
    if isinstance(info, dict) and info.get("rank") is not None:
        return int(info["rank"])
    return up[0][1] if up is not None and len(up[0]) == 2 else None


def plan_items(skeleton, trainer_state: dict, tensors: dict, shared: dict, out_dtype: torch.dtype) -> list[Item]:
    """The output tensors in ``save_pretrained`` order; checks the checkpoint against the architecture.

    ``tensors`` maps the checkpoint's model tensor names to (shape, dtype); ``shared`` maps
    names stored only as aliases of another tensor (tied weights, DeepSpeed) to that tensor.
    """
    modules = dict(skeleton.named_modules())
    rosa = trainer_state.get("rosa_layers") or {}
    problems = []
    for name, info in rosa.items():
        if name not in modules or not is_linear(modules[name]):
            problems.append(f"ROSA layer {name!r} is not a linear layer of {type(skeleton).__name__}")
        elif isinstance(info, dict) and "transposed" in info and bool(info["transposed"]) != \
                (not isinstance(modules[name], torch.nn.Linear)):
            problems.append(f"ROSA layer {name!r} is recorded with transposed={info['transposed']}, "
                            f"but the config's layer is a {type(modules[name]).__name__}")
    if problems:
        raise ConsolidateError("checkpoint does not match its model config: " + "; ".join(problems))

    every = skeleton.state_dict()  # tied aliases included: the checkpoint may hold them too
    written = saved_tensors(skeleton)
    _check_no_conversion(skeleton, list(written))
    fp32 = _fp32_patterns(skeleton, out_dtype)
    expected: dict[str, tuple] = {}  # checkpoint name -> shape wanted
    items, optional = [], set()
    for key, meta in every.items():
        owner, _, leaf = key.rpartition(".")
        shape = tuple(meta.shape)
        if owner in rosa:
            sources = (f"{owner}.base.{leaf}",)
            expected[sources[0]] = shape
            if leaf == "weight":
                out_f, in_f = linear_shape(modules[owner])
                rank = _rank(rosa[owner], tensors.get(owner + ".up"))
                expected[owner + ".up"], expected[owner + ".down"] = (out_f, rank), (rank, in_f)
                sources += (owner + ".up", owner + ".down")
        else:
            sources = (key,)
            expected[key] = shape
        if key not in written:
            optional.update(sources)
            continue
        stored = tensors.get(sources[0]) or tensors.get(shared.get(sources[0], ""))
        floating = meta.is_floating_point() if stored is None else stored[1].is_floating_point
        dtype = (torch.float32 if fp32 is not None and fp32.search(key) else out_dtype) if floating else \
            (stored[1] if stored else meta.dtype)
        items.append(Item(key, shape, dtype, sources, transposed=len(sources) == 3 and
                          not isinstance(modules[owner], torch.nn.Linear)))

    missing = [n for n in expected if n not in optional and n not in tensors and shared.get(n) not in tensors]
    wrong = [f"{n} is {tuple(tensors[n][0])}, the config wants {want}" for n, want in expected.items()
             if n in tensors and tuple(tensors[n][0]) != tuple(want)]
    unexpected = [n for n in tensors if n not in expected]
    if missing or wrong or unexpected:
        def some(names, what):
            return f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        parts = ([some(missing, "tensors missing")] if missing else []) + \
                ([some(wrong, "shapes differ")] if wrong else []) + \
                ([some(unexpected, "tensors not in the model")] if unexpected else [])
        raise ConsolidateError(f"checkpoint does not match its model config ({type(skeleton).__name__}): "
                               + "; ".join(parts))
    return items


# --------------------------------------------------------------------------- writing

class SafetensorsWriter:
    """One safetensors file written tensor by tensor: its header comes from the plan, so no tensor
    is kept once written (``safetensors.torch.save_file`` needs the whole shard in memory)."""

    def __init__(self, path: Path, items: list[Item], metadata: dict[str, str]):
        header: dict[str, typing.Any] = {"__metadata__": metadata}
        offset = 0
        for item in items:
            if item.dtype not in _SAFETENSORS_DTYPES:
                raise ConsolidateError(f"{item.name}: dtype {item.dtype} cannot be written to safetensors")
            header[item.name] = {"dtype": _SAFETENSORS_DTYPES[item.dtype], "shape": list(item.shape),
                                 "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path, self._pending = path, list(reversed(items))
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, value: torch.Tensor) -> None:
        item = self._pending.pop()
        if item.name != name or tuple(value.shape) != item.shape or value.dtype != item.dtype:
            raise AssertionError(f"{self.path.name}: got {name} {tuple(value.shape)} {value.dtype}, "
                                 f"planned {item.name} {item.shape} {item.dtype}")
        if value.numel():
            self._file.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        if self._pending:
            raise AssertionError(f"{self.path.name}: {len(self._pending)} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def merged_value(item: Item, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output tensor from its sources: ``w_fixed + up @ down`` in fp32 for a ROSA weight."""
    if len(item.sources) == 1:
        return values[item.sources[0]].to(item.dtype)
    w, up, down = (values.pop(n) for n in item.sources)
    merged = merge(w.T if item.transposed else w, up, down)  # the same fp32 fold as the live export
    del w, up, down
    return (merged.T if item.transposed else merged).to(item.dtype).contiguous()


def _batches(items: list[Item], reader) -> typing.Iterator[list[Item]]:
    """Consecutive items read together while their sources stay under _READ_BATCH_BYTES."""
    batch, size = [], 0
    for item in items:
        cost = sum(_nbytes(*reader.tensors[reader_name(reader, s)]) for s in item.sources)
        if batch and size + cost > _READ_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += cost
    if batch:
        yield batch


def reader_name(reader, name: str) -> str:
    """The name a tensor is stored under (a tied alias may be stored as its source only)."""
    return name if name in reader.tensors else reader.shared[name]


def _write_shards(tmp: Path, items: list[Item], reader, max_shard_size, total_parameters: int, progress: bool) -> dict:
    from huggingface_hub import split_torch_state_dict_into_shards
    from tqdm.auto import tqdm

    by_name = {item.name: item for item in items}
    split = split_torch_state_dict_into_shards(
        {i.name: torch.empty(i.shape, dtype=i.dtype, device="meta") for i in items},
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    bar = tqdm(total=len(items), desc=PROG, unit="tensor", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for filename, names in split.filename_to_tensors.items():
            shard = [by_name[n] for n in names]
            writer = SafetensorsWriter(tmp / filename, shard, {"format": "pt"})
            try:
                for batch in _batches(shard, reader):
                    values = reader.read(sorted({reader_name(reader, s) for i in batch for s in i.sources}))
                    for item in batch:
                        sources = {s: values[reader_name(reader, s)] for s in item.sources}
                        writer.write(item.name, merged_value(item, sources))
                        bar.update(1)
                    del values
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        bar.close()
    if split.is_sharded:
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"shards": len(split.filename_to_tensors), "bytes": split.metadata["total_size"]}


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _copy_model_files(model_dir: Path, tmp: Path, config, skeleton, dtype_name: str) -> None:
    """config.json (architectures and dtype as ``save_pretrained`` sets them), then every other
    file of ``model/`` (generation config, tokenizer) as it is."""
    config.dtype = dtype_name
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(tmp)
    for src in model_dir.iterdir():
        if src.name == "config.json" or src.name.endswith(_WEIGHT_FILES):
            continue
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / src.name)
    if not (tmp / "generation_config.json").exists() and skeleton.can_generate() \
            and getattr(skeleton, "generation_config", None) is not None:
        skeleton.generation_config.save_pretrained(tmp)  # what save_pretrained would add


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ConsolidateError(f"{out} already exists and is not empty (--force replaces it)")


def consolidate(ckpt: str | Path, out: str | Path, dtype: str = "auto", max_shard_size: int | str = "5GB",
                force: bool = False, progress: bool = True) -> dict:
    """Write the merged model of checkpoint ``ckpt`` to the Hugging Face folder ``out``; returns a summary."""
    out = Path(out).expanduser()
    _check_out(out, force)
    folder = resolve_checkpoint(ckpt)
    trainer_state = read_trainer_state(folder)
    if dtype == "auto":
        dtype = trainer_state.get("model_dtype") or "float32"
    if dtype not in DTYPES:
        raise ConsolidateError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out_dtype = DTYPES[dtype]
    config, skeleton = build_skeleton(folder / "model")
    if trainer_state["format"] == "dcp":
        reader = DcpReader(folder / "state")
    else:
        reader = ZeroReader(folder / "deepspeed" / "state", trainer_state.get("world_size"))
    items = plan_items(skeleton, trainer_state, reader.tensors, reader.shared, out_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        summary = _write_shards(tmp, items, reader, max_shard_size, skeleton.num_parameters(), progress)
        _copy_model_files(folder / "model", tmp, config, skeleton, dtype)
        _check_out(out, force)  # nothing appeared there meanwhile
        if out.exists() or out.is_symlink():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists() or old.is_symlink():
            old.unlink()
    return {"checkpoint": str(folder), "out": str(out), "tensors": len(items), "dtype": dtype,
            "step": trainer_state.get("step"), **summary}


# --------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shard_size(text: str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return parse_size_to_int(text) if not text.isdigit() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size like 5GB or 500MB: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint folder, a checkpoints/ folder or a run's output_dir (then checkpoints/latest)")
    parser.add_argument("out", metavar="OUT", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the written floating-point tensors; auto: the run's model_dtype [default: auto]")
    parser.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                        help="largest safetensors file (a bigger single tensor gets its own) [default: 5GB]")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = consolidate(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                              force=args.force, progress=args.progress)
    except (ConsolidateError, OSError) as err:
        if os.environ.get("ROSA_SCALE_DEBUG"):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {summary['out']}: {summary['tensors']} tensors, {summary['bytes'] / 1e6:,.1f} MB "
          f"{summary['dtype']} in {summary['shards']} shard(s), from {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
