"""Reading checkpoint files without running code from them.

A pickle can call any function while it is read, so a checkpoint file is only ever unpickled
here with an allowlist of what real checkpoints contain:

- DCP's ``.metadata`` (a plain pickle): :func:`read_dcp_metadata`, an unpickler that builds only
  DCP's metadata classes, ``torch.Size``, dtypes, layouts and paths;
- DCP's non-tensor items (optimizer ``param_groups`` values): ``torch.load(weights_only=True)``
  (:func:`dcp_load`; DCP reads tensors that way already);
- DeepSpeed ZeRO-3's ``*_model_states.pt`` / ``*_optim_states.pt``: :func:`torch_load`, that is
  ``torch.load(weights_only=True)`` plus the three DeepSpeed classes such a file holds, none of
  which runs code when built; :func:`protect_deepspeed_engine` makes a DeepSpeed engine's
  ``load_checkpoint`` read through it.

A refused file raises :class:`UnsafeCheckpointError`, a damaged one :class:`CorruptCheckpointError`:
one line naming the file, with nothing from the file run.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path, PurePath

import torch
import torch.distributed as dist

METADATA_FILE = ".metadata"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code (or build objects no checkpoint holds) if unpickled."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or not what its name says."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _refused(path, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing to load {path}: it would call {name}, which no checkpoint of tensors "
                                 "and plain data holds (a crafted or foreign file; nothing in it was run)")


def _corrupt(path, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"checkpoint incomplete or corrupt: cannot read {path}: {detail}")


# --------------------------------------------------------------------------- DCP metadata

# Every global that torch 2.13's DCP pickles into .metadata (1 and 2 FSDP2 ranks, model + AdamW
# state): dataclasses and an Enum whose construction only stores fields.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # a tuple
    "torch.serialization": {"_get_layout"},  # looks a name up among torch's layouts, nothing else
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP metadata holds; any other global is refused before its module is imported."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # not getattr: it imports
            return vars(torch)[name]  # a dtype object, not a callable
        if module == "pathlib" or module.startswith("pathlib."):  # StorageMeta.checkpoint_id: a path, data only
            found = getattr(sys.modules.get(module), name, None)
            if isinstance(found, type) and issubclass(found, PurePath):
                return found
        raise _refused(self.path, f"{module}.{name}")


def read_dcp_metadata(folder) -> "torch.distributed.checkpoint.metadata.Metadata":
    """The ``Metadata`` of a DCP checkpoint folder, unpickled with an allowlist (DCP itself uses
    ``pickle.load``, which runs whatever the file names)."""
    path = Path(folder) / METADATA_FILE
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file, path).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint incomplete: {path} is missing (no DCP metadata)") from None
    except Exception as err:  # a truncated or foreign pickle raises anything
        raise _corrupt(path, _first_line(err)) from None
    problem = _metadata_problem(metadata)
    if problem:
        raise _corrupt(path, problem)
    return metadata


def _metadata_problem(metadata) -> str | None:
    """What makes an unpickled object unusable as DCP metadata (fields of the wrong kinds), if anything."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       TensorProperties, TensorStorageMetadata)

    if not isinstance(metadata, Metadata):
        return f"it holds a {type(metadata).__name__}, not DCP metadata"
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        return "its state_dict_metadata or storage_data is not a dict"
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            continue
        if not (isinstance(md, TensorStorageMetadata) and isinstance(md.properties, TensorProperties)
                and isinstance(md.properties.dtype, torch.dtype) and isinstance(md.size, torch.Size)
                and isinstance(md.chunks, list) and all(isinstance(c, ChunkStorageMetadata) for c in md.chunks)):
            return f"the entry of {key!r} is malformed"
    for info in metadata.storage_data.values():
        if not (isinstance(info, _StorageInfo) and isinstance(info.relative_path, str)
                and type(info.offset) is int and type(info.length) is int and info.offset >= 0 and info.length >= 0):
            return f"a storage entry is malformed ({type(info).__name__})"
    return None


def check_dcp_files(folder, metadata) -> None:
    """Every data file the metadata points into exists and is long enough."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = Path(folder) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise _corrupt(Path(folder) / METADATA_FILE, f"it points outside its folder ({name})")
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint incomplete: {file} is missing (the DCP metadata refers to it; "
                                         "was it written by a rank that did not finish?)")
        if file.stat().st_size < size:
            raise CorruptCheckpointError(f"checkpoint incomplete: {file} is truncated "
                                         f"({file.stat().st_size} bytes, the metadata needs {size})")


# --------------------------------------------------------------------------- weights-only torch.load

_UNPICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")

# What a DeepSpeed 0.19.8 ZeRO-3 checkpoint pickles beyond tensors, OrderedDict, torch.Size and
# plain data (written on CPU in fp32 and bf16; DynamicLossScaler from its source: fp16's scaler).
# Building each runs its __init__ (storing numbers) or an Enum lookup; loading sets attributes.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


def _deepspeed_globals(import_it: bool) -> list:
    """The DeepSpeed classes above, if DeepSpeed is loaded already (or ``import_it``)."""
    if "deepspeed" not in sys.modules and not import_it:
        return []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def _weights_only_error(path, err: pickle.UnpicklingError) -> ValueError:
    """torch's weights-only refusal (a page of advice) as one line naming the file."""
    found = _UNPICKLED_GLOBAL.search(str(err))
    if found:
        return _refused(path, found.group(1))
    lines = [line.strip() for line in str(err).splitlines()]
    detail = next((line for line in lines if line and not line.startswith(_BOILERPLATE)), "not a torch.save file")
    return _corrupt(path, detail)


def _load(source, extra: list, kwargs: dict):
    with torch.serialization.safe_globals(extra):
        return torch.load(source, weights_only=True, **kwargs)


def torch_load(path, **kwargs):
    """``torch.load(path, weights_only=True, **kwargs)`` that also accepts DeepSpeed ZeRO-3's own
    files: only tensors, plain data and :data:`DEEPSPEED_GLOBALS` are built."""
    if kwargs.pop("weights_only", True) is not True or "pickle_module" in kwargs:
        raise TypeError("torch_load always loads with weights_only=True and torch's own unpickler")
    try:
        try:
            return _load(path, _deepspeed_globals(import_it=False), kwargs)
        except pickle.UnpicklingError as err:
            found = _UNPICKLED_GLOBAL.search(str(err))
            if not found or found.group(1) not in DEEPSPEED_GLOBALS or "deepspeed" in sys.modules:
                raise
            # A DeepSpeed checkpoint read before DeepSpeed was imported: import it and read again.
            return _load(path, _deepspeed_globals(import_it=True), kwargs)
    except pickle.UnpicklingError as err:
        raise _weights_only_error(path, err) from None
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint incomplete: {path} is missing") from None
    except Exception as err:  # truncated zip, bad storage, ...
        raise _corrupt(path, _first_line(err)) from None


# --------------------------------------------------------------------------- DCP load

@functools.cache
def _safe_dcp_classes():
    """A FileSystemReader and a DefaultLoadPlanner that unpickle nothing but data (built once: DCP is
    imported only when a DCP checkpoint is read)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """Metadata from :func:`read_dcp_metadata`; errors name the data file being read."""

        def __init__(self, folder: Path, metadata=None):
            super().__init__(str(folder))
            self.folder, self.metadata, self.current = folder, metadata, None

        def read_metadata(self):  # no **kwargs: DCP then never falls back to rank-local metadata files
            md = self.metadata if self.metadata is not None else read_dcp_metadata(self.folder)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def _slice_file(self, file, sinfo):
            self.current = Path(getattr(file, "name", self.folder))
            return super()._slice_file(file, sinfo)

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except (UnsafeCheckpointError, CorruptCheckpointError):
                raise
            except pickle.UnpicklingError as err:
                raise _weights_only_error(self.current or self.folder, err) from None
            except Exception as err:
                raise _corrupt(self.current or self.folder, _first_line(err)) from None

    class SafePlanner(DefaultLoadPlanner):
        """Non-tensor items with ``weights_only=True`` (DCP's own planner unpickles them freely)."""

        def __init__(self, reader: SafeReader):
            super().__init__()
            self.reader = reader

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            where = f"{self.reader.current or self.reader.folder} (item {read_item.dest_index.fqn})"
            try:
                loaded = _load(value, [], {})
            except pickle.UnpicklingError as err:
                raise _weights_only_error(where, err) from None
            except Exception as err:
                raise _corrupt(where, _first_line(err)) from None
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeReader, SafePlanner


def _agree(error: ValueError | None, group=None) -> None:
    """Raise the same error on every rank if any rank has one (no rank is left in a collective)."""
    if dist.is_available() and dist.is_initialized():
        found: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, None if error is None else (type(error).__name__, str(error)), group=group)
        kinds = {cls.__name__: cls for cls in (UnsafeCheckpointError, CorruptCheckpointError)}
        first = next((f for f in found if f is not None), None)
        error = None if first is None else kinds.get(first[0], CorruptCheckpointError)(first[1])
    if error is not None:
        raise error


def _from_failures(err: BaseException, folder: Path) -> ValueError:
    """DCP's CheckpointException (a BaseException, with a traceback per rank) as one line: the first
    rank's error of ours if there is one, else the first rank's error."""
    causes = [f[0] if isinstance(f, tuple) else f for _, f in sorted((getattr(err, "failures", None) or {}).items())]
    ours = [c for c in causes if isinstance(c, (UnsafeCheckpointError, CorruptCheckpointError))]
    if ours:
        return type(ours[0])(str(ours[0]))
    return _corrupt(folder, _first_line(causes[0] if causes else err))


class _DropOurTracebacks(logging.Filter):
    """DCP logs a failed metadata read with its traceback before raising it: the raised line is enough."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], (UnsafeCheckpointError,
                                                                        CorruptCheckpointError)))


def dcp_load(state_dict: dict, folder, *, no_dist: bool, process_group=None, metadata=None) -> None:
    """``dcp.load(state_dict, checkpoint_id=folder, no_dist=no_dist)`` without unpickling code.

    The metadata is read by :func:`read_dcp_metadata` (pass ``metadata`` if it was read already,
    without a process group) and its data files are checked first; with a process group every rank
    reads it and all ranks stop with the same error if one fails. Non-tensor items load with
    ``weights_only=True``. Any failure, DCP's CheckpointException included, is one
    :class:`UnsafeCheckpointError` or :class:`CorruptCheckpointError` line naming the file.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    use_dist = not no_dist and dist.is_available() and dist.is_initialized()
    error = None
    try:
        if metadata is None or use_dist:
            metadata = read_dcp_metadata(folder)
        check_dcp_files(folder, metadata)
    except (UnsafeCheckpointError, CorruptCheckpointError) as err:
        error = err
    if use_dist:
        _agree(error, process_group)
    elif error is not None:
        raise error
    reader_class, planner_class = _safe_dcp_classes()
    reader = reader_class(folder, metadata)
    planner = planner_class(reader)
    root = logging.getLogger()  # DCP's state_dict_loader logs to the root logger
    quiet = _DropOurTracebacks()
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": loading in one process is the plan
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state_dict, storage_reader=reader, planner=planner, process_group=process_group,
                     no_dist=not use_dist)
    except CheckpointException as err:
        raise _from_failures(err, folder) from None
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as err:  # a plan that does not fit the state_dict (missing keys, shapes)
        raise _corrupt(folder, _first_line(err)) from None
    finally:
        root.removeFilter(quiet)


# --------------------------------------------------------------------------- DeepSpeed

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _every_torch_load_weights_only():
    """Within: every ``torch.load`` (also DeepSpeed's direct ones, e.g. zero_to_fp32 or universal
    checkpoints) is weights-only, with :data:`DEEPSPEED_GLOBALS` allowed."""
    saved = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals(import_it=True)):
            yield
    finally:
        if saved is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = saved


def _scan(folder: Path) -> ValueError | None:
    """A refusal or corruption in any ``*.pt`` of a DeepSpeed checkpoint folder, found without
    unpickling: the globals each file's pickle names, and whether its zip is whole."""
    allowed = set(DEEPSPEED_GLOBALS)
    for file in sorted(folder.glob("*.pt")):
        if not zipfile.is_zipfile(file):
            with open(file, "rb") as head:
                if head.read(1) == b"\x80":  # a legacy (non-zip) torch.save: left to torch_load, on its rank
                    continue
            return _corrupt(file, "not a torch.save file (truncated?)")
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception as err:
            return _corrupt(file, _first_line(err))
        bad = [n for n in names if n not in allowed]
        if bad:
            return _refused(file, bad[0])
    return None


def protect_deepspeed_engine(engine):
    """Make ``engine.load_checkpoint`` read every file weights-only (DeepSpeed's own loader uses
    ``torch.load(weights_only=False)``). Before reading, every rank scans every ``*.pt`` of the
    checkpoint for refused globals and damaged zips, and all ranks stop with the same line if one is
    found; then each file goes through :func:`torch_load` (``engine.checkpoint_engine.load``), and
    any other ``torch.load`` DeepSpeed makes meanwhile is forced weights-only. Returns ``engine``.
    """
    if getattr(engine.load_checkpoint, "_rosa_safe", False):
        return engine
    original = engine.load_checkpoint

    def safe_engine_load(path, map_location=None):
        return torch_load(path, map_location=map_location)

    @functools.wraps(original)
    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        engine.checkpoint_engine.load = safe_engine_load  # (re)made at DeepSpeed's init; set it every time
        name = tag
        latest = Path(load_dir) / "latest"
        if name is None and latest.is_file():
            name = latest.read_text().strip()
        error = _scan(Path(load_dir) / str(name)) if name is not None and (Path(load_dir) / str(name)).is_dir() \
            else None
        _agree(error)
        try:
            with _every_torch_load_weights_only():
                return original(load_dir, tag, *args, **kwargs)
        except pickle.UnpicklingError as err:  # a direct torch.load inside DeepSpeed, refused
            raise _weights_only_error(load_dir, err) from None

    load_checkpoint._rosa_safe = True
    engine.load_checkpoint = load_checkpoint
    return engine
