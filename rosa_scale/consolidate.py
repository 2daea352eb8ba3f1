"""`rosa-consolidate`: a training checkpoint -> one merged Hugging Face model folder (safetensors).

    rosa-consolidate CKPT OUT [--dtype auto|float32|bfloat16|float16] [--max-shard-size 5GB] [--force]

CKPT is a checkpoint folder (``<output_dir>/checkpoints/step-00000120``), a ``checkpoints/``
folder or a run's output_dir (both mean the checkpoint named in ``checkpoints/latest``),
written by any engine: a ``torch.distributed.checkpoint`` folder (``state/``, from 1 or N ranks)
or DeepSpeed ZeRO-3's own checkpoint (``deepspeed/state/``). OUT becomes the folder the plain
model's ``save_pretrained`` would write, which ``AutoModelForCausalLM.from_pretrained(OUT)``
loads without rosa_scale: the original tensor names and shapes, every ROSA layer merged
(``w_fixed + up @ down`` in fp32, back in the layer's own layout, then cast), tied weights left
out, weights transformers converts on loading converted back (e.g. MoE experts written per
expert), shards named and indexed as transformers names them, config/generation
config/tokenizer from the checkpoint's ``model/``.

Memory stays bounded whatever the model or shard size, on one CPU machine, without a process
group: the shard layout is planned up front from the checkpoint's metadata (names, shapes,
dtypes), so each shard file's header is written first and every tensor is appended as soon as it
is merged. Only the sources of one output tensor (a ROSA layer's ``base.weight``, ``up`` and
``down`` together) and its merged value are in memory at a time, never a shard or the model.

Everything goes to a hidden sibling folder of OUT that is renamed into place at the end: on any
error nothing is left at OUT, and an existing OUT (replaced only with ``--force``) stays as it
was. OUT may not be the checkpoint, its ``checkpoints/`` folder or its run folder, contain any of
them, or lie inside the first two (``<run>/hf`` is fine): --force would delete the source. No
file is unpickled beyond tensors and plain data (``rosa_scale.safe_load``): a crafted file is
refused, not run. Bad input, a damaged or missing part included, gets one line
``rosa-consolidate: error: ...`` naming the file, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cli import Parser
from .factorize import merge
from .layer import is_linear, linear_shape
from .quant import drop_quantization_config
from .safe_load import (CorruptCheckpointError, UnsafeCheckpointError, check_dcp_files, dcp_load, read_dcp_metadata,
                        torch_load)

PROG = "rosa-consolidate"
CHECKPOINTS = "checkpoints"  # <run>/checkpoints/step-XXXXXXXX
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_FILE = "trainer_state.json"
MODEL_KEY = "model."  # the DCP state is {"model": model_state_dict, "optim": ...}, flattened
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
        raise ConsolidateError(f"{path} is not a folder (give a checkpoint folder, a checkpoints/ folder "
                               "or a run's output_dir)")
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
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        self.metadata = read_dcp_metadata(folder)  # allowlisted: DCP's own read would run any pickled call
        check_dcp_files(folder, self.metadata)
        self.tensors = {key[len(MODEL_KEY):]: (tuple(md.size), md.properties.dtype)
                        for key, md in self.metadata.state_dict_metadata.items()
                        if key.startswith(MODEL_KEY) and isinstance(md, TensorStorageMetadata)}
        self.shared: dict[str, str] = {}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = {MODEL_KEY + n: torch.empty(self.tensors[n][0], dtype=self.tensors[n][1]) for n in names}
        dcp_load(state, self.folder, no_dist=True, metadata=self.metadata)  # errors name the file
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

    reopen_bytes = 64 << 20

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

    def _load(self, file: Path, keys: tuple[str, ...]) -> dict:
        """One rank file, memory-mapped, weights-only (no code from it runs); a dict with ``keys``."""
        state = torch_load(file, map_location="cpu", mmap=True)
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise ConsolidateError(f"checkpoint corrupt: {file} is not a DeepSpeed ZeRO-3 rank file "
                                   f"(it has no {', '.join(missing)})")
        return state

    def _open(self) -> None:
        self._model_states = [self._load(f, ("module",)) for f in self.model_files]
        self._flat_groups = []
        for file in self.optim_files:
            state = self._load(file, (OPTIMIZER_STATE_DICT,))[OPTIMIZER_STATE_DICT]
            if not isinstance(state, dict) or not isinstance(state.get(FP32_FLAT_GROUPS), list) \
                    or not all(isinstance(t, torch.Tensor) for t in state[FP32_FLAT_GROUPS]):
                raise ConsolidateError(f"checkpoint corrupt: {file} holds no fp32 flat groups")
            stage, count = state.get(ZERO_STAGE), state.get(PARTITION_COUNT)
            count = max(count) if isinstance(count, list) else count
            if stage != 3:
                raise ConsolidateError(f"{file} is a ZeRO stage {stage} checkpoint; only ZeRO-3 checkpoints "
                                       "are supported")
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


def _fp32_patterns(skeleton, dtype: torch.dtype):
    """Parameters ``from_pretrained`` keeps in fp32 at this dtype (``_keep_in_fp32_modules``): written in fp32."""
    try:
        from transformers.core_model_loading import build_glob_alternation

        plan = skeleton._get_dtype_plan(dtype)
        return build_glob_alternation(list(plan))[0] if plan else None
    except (ImportError, AttributeError):
        return None


class Spec(typing.NamedTuple):
    """A tensor as written: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


@dataclass
class Item:
    """One tensor of the plain model: where it comes from and what is written for it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[str, ...]  # one tensor, or a ROSA layer's (base.weight, up, down)
    transposed: bool = False  # a Conv1D weight: stored (in, out), the factors are (out x r), (r x in)
    quantized: int = 0  # a quantized base: its first ``quantized`` sources are the base's saved state
    outputs: list[Spec] = field(default_factory=list)  # itself, unless transformers converts it on saving


def _rank(info, up) -> int | None:
    """The recorded rank of a ROSA layer, else the one its stored ``up`` has."""
    if isinstance(info, dict) and info.get("rank") is not None:
        return int(info["rank"])
    return up[0][1] if up is not None and len(up[0]) == 2 else None


def tied_copies(skeleton, tensors: dict) -> list[tuple[str, str]]:
    """(alias, written name) of every tied tensor the checkpoint also stores under its alias."""
    written = saved_tensors(skeleton)
    names: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    pairs = []
    for group in names.values():
        kept = [n for n in group if n in written]
        pairs += [(n, kept[0]) for n in group if kept and n not in written and n in tensors]
    return pairs


def check_ties(skeleton, reader) -> None:
    """A weight the config ties must be stored equal to the one written (else the run trained them apart)."""
    for alias, name in tied_copies(skeleton, reader.tensors):
        values = reader.read([alias, name])
        if not torch.equal(values[alias], values[name]):
            raise ConsolidateError(f"checkpoint does not match its model config ({type(skeleton).__name__}): "
                                   f"{alias} differs from {name}, which the config ties it to")


def _mismatch(skeleton, groups: dict[str, list[str]]) -> None:
    """One line naming up to 3 examples of each kind of disagreement with the model config."""
    parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for what, names in groups.items() if names]
    if parts:
        raise ConsolidateError(f"checkpoint does not match its model config ({type(skeleton).__name__}): "
                               + "; ".join(parts))


def plan_items(skeleton, trainer_state: dict, tensors: dict, shared: dict, out_dtype: torch.dtype) -> list[Item]:
    """The output tensors in the architecture's order; checks the checkpoint against the architecture.

    ``tensors`` maps the checkpoint's model tensor names to (shape, dtype); ``shared`` maps
    names stored only as aliases of another tensor (tied weights, DeepSpeed) to that tensor.
    """
    modules = dict(skeleton.named_modules())
    rosa = trainer_state.get("rosa_layers")
    if rosa is None:  # not recorded: every layer stored as base.weight + up + down
        rosa = {n[:-len(".base.weight")]: {} for n in tensors if n.endswith(".base.weight")
                and n[:-len(".base.weight")] + ".up" in tensors}
    conv1d = {n for n in rosa if n in modules and is_linear(modules[n]) and not isinstance(modules[n], torch.nn.Linear)}
    _mismatch(skeleton, {
        "ROSA layers that are not linear layers of the model": [n for n in rosa if n not in modules
                                                               or not is_linear(modules[n])],
        "ROSA layers recorded with the wrong layout": [n for n, info in rosa.items() if isinstance(info, dict)
                                                      and "transposed" in info and n in modules
                                                      and bool(info["transposed"]) != (n in conv1d)]})

    every = skeleton.state_dict()  # tied aliases included: the checkpoint may hold them too
    written = saved_tensors(skeleton)
    fp32 = _fp32_patterns(skeleton, out_dtype)
    expected: dict[str, tuple] = {}  # checkpoint name -> the shape the config gives it
    items, optional = [], set()
    for key, meta in every.items():
        owner, _, leaf = key.rpartition(".")
        quantized = ()
        if owner in rosa and leaf == "weight" and _is_quantized(rosa[owner], owner, tensors):
            quantized = sorted(n for n in tensors if n.startswith(owner + ".base.") and n != owner + ".base.bias")
            out_f, in_f = linear_shape(modules[owner])
            rank = _rank(rosa[owner], tensors.get(owner + ".up"))
            sources = (*quantized, *(f"{owner}.{t}" for t in QUANT_PARTS))
            expected.update({n: tuple(tensors[n][0]) for n in quantized})  # packed codes: any layout
            expected.update(_quant_shapes(owner, out_f, in_f, rank, tensors))
        elif owner in rosa:
            sources = (f"{owner}.base.{leaf}",)
            if leaf == "weight":
                out_f, in_f = linear_shape(modules[owner])
                rank = _rank(rosa[owner], tensors.get(owner + ".up"))
                sources += (owner + ".up", owner + ".down")
                expected[owner + ".up"], expected[owner + ".down"] = (out_f, rank), (rank, in_f)
        else:
            sources = (key,)
        if not quantized:
            expected[sources[0]] = tuple(meta.shape)
        if key not in written:  # a tied alias: not written, and the checkpoint need not hold it
            optional.update(sources)
            continue
        stored = tensors.get(sources[0]) or tensors.get(shared.get(sources[0], ""))
        dtype = meta.dtype if quantized or not stored else stored[1]
        if dtype.is_floating_point:
            dtype = torch.float32 if fp32 is not None and fp32.search(key) else out_dtype
        items.append(Item(key, tuple(meta.shape), dtype, sources, transposed=owner in conv1d and leaf == "weight",
                          quantized=len(quantized)))

    _mismatch(skeleton, {
        "tensors missing": [n for n in expected if n not in optional and n not in tensors
                            and shared.get(n) not in tensors],
        "shapes differ": [f"{n} is {tuple(tensors[n][0])}, the config wants {want}" for n, want in expected.items()
                          if n in tensors and tuple(tensors[n][0]) != tuple(want)],
        "tensors not in the model": [n for n in tensors if n not in expected]})
    return items


# What a quantized ROSA layer saves beside its base (rosa_scale.quant.QuantRosaLinear): the sources of
# its merged weight, then two tensors the merge does not need (window count, the guard's bound).
QUANT_PARTS = ("up", "down", "up0", "down0", "stack_up", "stack_down")
QUANT_UNUSED = ("windows", "frozen_peak")


def _is_quantized(info, owner: str, tensors: dict) -> bool:
    """A ROSA layer over a quantized base: recorded so, or (older records) saved with a stack."""
    return bool(isinstance(info, dict) and info.get("quantize")) or owner + ".stack_up" in tensors


def _quant_shapes(owner: str, out_f: int, in_f: int, rank, tensors: dict) -> dict[str, tuple]:
    """The shapes the config gives a quantized layer's ROSA tensors (the stack: any width, both alike)."""
    width = tensors.get(owner + ".stack_up", ((out_f, 0),))[0][-1]
    shapes = {"up": (out_f, rank), "down": (rank, in_f), "up0": (out_f, rank), "down0": (rank, in_f),
              "stack_up": (out_f, width), "stack_down": (width, in_f)}
    shapes = {f"{owner}.{k}": v for k, v in shapes.items()}
    shapes.update({f"{owner}.{k}": tuple(tensors[f"{owner}.{k}"][0]) for k in QUANT_UNUSED
                   if f"{owner}.{k}" in tensors})
    return shapes


def plan_outputs(skeleton, items: list[Item]):
    """Fill each item's ``outputs``: what ``save_pretrained`` writes for it after reverting
    transformers' load-time weight conversions (renamed keys; fused MoE experts written back per
    expert). Returns ``convert(name, tensor) -> {name: tensor}``, which does that to one tensor.
    A model whose conversion needs several tensors at once (it could not stream) is refused.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions
        revert_weight_conversion = None

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return revert_weight_conversion(skeleton, {name: tensor}) if revert_weight_conversion else {name: tensor}

    meta = {i.name: torch.empty(i.shape, dtype=i.dtype, device="meta") for i in items}
    problem = None
    try:
        for item in items:
            item.outputs = [Spec(k, tuple(v.shape), v.dtype) for k, v in convert(item.name, meta[item.name]).items()]
        if revert_weight_conversion:
            whole = {k: tuple(v.shape) for k, v in revert_weight_conversion(skeleton, dict(meta)).items()}
            if whole != {o.name: o.shape for i in items for o in i.outputs}:
                problem = "it converts several tensors together"
    except Exception as err:  # a converter missing its other tensors raises anything
        problem = _first_line(err)
    if problem:
        raise ConsolidateError(f"{type(skeleton).__name__}: transformers converts its weights when saving them in a "
                               f"way rosa-consolidate cannot do one tensor at a time ({problem})")
    return convert


# --------------------------------------------------------------------------- writing

class SafetensorsWriter:
    """One safetensors file written tensor by tensor: its header comes from the plan, so no tensor
    is kept once written (``safetensors.torch.save_file`` needs the whole shard in memory)."""

    def __init__(self, path: Path, items: list[Spec], metadata: dict[str, str]):
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

    @property
    def done(self) -> bool:
        return not self._pending

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
    if item.quantized:
        return _merged_quantized(item, values)
    w, up, down = (values.pop(n) for n in item.sources)
    merged = merge(w.T if item.transposed else w, up, down)  # the same fp32 fold as the live export
    del w, up, down
    return (merged.T if item.transposed else merged).to(item.dtype).contiguous()


def _merged_quantized(item: Item, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``deq(Q0) + S + up @ down - up0 @ down0`` in fp32 from a quantized layer's saved state, cast."""
    from .quant import dequantize_saved, merged_from_parts

    base_names = item.sources[:item.quantized]
    prefix = base_names[0][:base_names[0].index(".base.") + len(".base.")]
    try:
        base = dequantize_saved({n[len(prefix):]: values.pop(n) for n in base_names})
    except (ValueError, KeyError, RuntimeError) as err:
        raise ConsolidateError(f"cannot dequantize {prefix}weight: {_first_line(err)}") from None
    if tuple(base.shape) != item.shape:
        raise ConsolidateError(f"{prefix}weight dequantizes to {tuple(base.shape)}, the config wants {item.shape}")
    parts = [values.pop(n) for n in item.sources[item.quantized:]]
    return merged_from_parts(base, *parts).to(item.dtype).contiguous()


def reader_name(reader, name: str) -> str:
    """The name a tensor is stored under (a tied alias may be stored as its source only)."""
    return name if name in reader.tensors else reader.shared[name]


def _write_shards(tmp: Path, items: list[Item], reader, convert, max_shard_size, total_parameters: int,
                  progress: bool) -> dict:
    """Every item read, merged, converted and appended to its shard; shards planned as transformers plans them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from tqdm.auto import tqdm

    specs = {o.name: o for item in items for o in item.outputs}
    split = split_torch_state_dict_into_shards(
        {s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs.values()},
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    writers: dict[str, SafetensorsWriter] = {}  # open shards (a tensor above max_shard_size gets its own)
    bar = tqdm(total=len(items), desc=PROG, unit="tensor", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for item in items:  # one output tensor's sources in memory at a time
            values = reader.read([reader_name(reader, s) for s in item.sources])
            value = merged_value(item, {s: values[reader_name(reader, s)] for s in item.sources})
            del values
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ConsolidateError(f"{item.name} of {reader.folder} holds NaN or inf (merged from "
                                       f"{', '.join(item.sources)}): the run had diverged; no model was written")
            for name, tensor in convert(item.name, value).items():
                file = split.tensor_to_filename[name]
                if file not in writers:
                    writers[file] = SafetensorsWriter(tmp / file, [specs[n] for n in split.filename_to_tensors[file]],
                                                      {"format": "pt"})
                writers[file].write(name, tensor)
                if writers[file].done:
                    writers.pop(file).close()
            bar.update(1)
        if writers:
            raise AssertionError(f"shards left incomplete: {sorted(writers)}")
    finally:
        bar.close()
        for writer in writers.values():
            writer.abort()
    if split.is_sharded:
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"tensors": len(specs), "shards": len(split.filename_to_tensors), "bytes": split.metadata["total_size"]}


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _copy_model_files(model_dir: Path, tmp: Path, config, skeleton, dtype_name: str) -> None:
    """config.json (architectures and dtype as ``save_pretrained`` sets them), then every other
    file of ``model/`` (generation config, tokenizer) as it is."""
    config.dtype = dtype_name
    config.architectures = [type(skeleton).__name__]
    drop_quantization_config(config)  # the merged weights are plain
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


def _check_not_the_source(out: Path, folder: Path) -> None:
    """OUT must not be, contain or lie inside the checkpoint or its ``checkpoints/`` folder, nor be or
    contain its run folder: with --force that would delete the source. Real paths are compared (symlinks)."""
    real_out, ckpt = Path(os.path.realpath(out)), Path(os.path.realpath(folder))
    guarded = [("the checkpoint", ckpt, True)]
    if ckpt.parent.name == CHECKPOINTS:
        guarded += [("the checkpoints folder", ckpt.parent, True), ("the run folder", ckpt.parent.parent, False)]
    for what, path, not_inside in guarded:
        relation = ("is" if real_out == path else "contains" if path.is_relative_to(real_out)
                    else "is inside" if not_inside and real_out.is_relative_to(path) else None)
        if relation:
            safe = ckpt.parent.parent / "hf" if ckpt.parent.name == CHECKPOINTS else ckpt.parent / f"{ckpt.name}-hf"
            raise ConsolidateError(f"OUT {out} {relation} {what} ({path}), which it is made from: "
                                   f"write it elsewhere, e.g. {safe}")


def consolidate(ckpt: str | Path, out: str | Path, dtype: str = "auto", max_shard_size: int | str = "5GB",
                force: bool = False, progress: bool = True) -> dict:
    """Write the merged model of checkpoint ``ckpt`` to the Hugging Face folder ``out``; returns a summary."""
    out = Path(out).expanduser()
    folder = resolve_checkpoint(ckpt)
    _check_not_the_source(out, folder)
    _check_out(out, force)
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
    convert = plan_outputs(skeleton, items)
    check_ties(skeleton, reader)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        summary = _write_shards(tmp, items, reader, convert, max_shard_size, skeleton.num_parameters(), progress)
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
    return {"checkpoint": str(folder), "out": str(out), "dtype": dtype,
            "step": trainer_state.get("step"), **summary}


# --------------------------------------------------------------------------- command line

def _shard_size(text: str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return parse_size_to_int(text) if not text.isdigit() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size like 5GB or 500MB: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Merge a ROSA training checkpoint into one plain Hugging Face model "
                                            "folder (safetensors), streaming tensor by tensor.")
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint folder, a checkpoints/ folder or a run's output_dir "
                             "(then checkpoints/latest)")
    parser.add_argument("out", metavar="OUT", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the written floating-point tensors; auto: the run's model_dtype [default: auto]")
    parser.add_argument("--max-shard-size", type=_shard_size, default="5GB", metavar="SIZE",
                        help="largest safetensors file (a bigger single tensor gets its own) [default: 5GB]")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it exists (only once the new one is complete; never the checkpoint, "
                             "its checkpoints/ folder or its run folder)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading a DeepSpeed checkpoint needs no device
    try:
        summary = consolidate(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                              force=args.force, progress=args.progress)
    except (ConsolidateError, UnsafeCheckpointError, CorruptCheckpointError, OSError) as err:
        if os.environ.get("ROSA_SCALE_DEBUG"):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {summary['out']}: {summary['tensors']} tensors, {summary['bytes'] / 1e6:,.1f} MB "
          f"{summary['dtype']} in {summary['shards']} shard(s), from {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
