"""Checkpoint files that would run code, damaged parts, and an OUT that is the source.

A crafted pickle (a shell command that creates a marker file) is put where each checkpoint reader
looks: DCP's ``.metadata``, a DCP non-tensor item, DeepSpeed ZeRO-3's model-states and optim-states
files. The plain readers run it (checked first, so each test proves something); ``rosa_scale.safe_load``
and ``rosa-consolidate`` refuse it with one line naming the file, exit status 2, and the marker never
appears. Real checkpoints (one process, 2 FSDP2 ranks, 2 ZeRO-3 ranks) still read identically,
collectively too (``tests/safe_load_worker.py``). ``rosa-consolidate --force`` never deletes its source.
"""
import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa
from rosa_scale.checkpoint import save_checkpoint
from rosa_scale.consolidate import main
from rosa_scale.safe_load import (DEEPSPEED_GLOBALS, CorruptCheckpointError, UnsafeCheckpointError, dcp_load,
                                  read_dcp_metadata, torch_load)
from tests.rank_runs import run_ranks
from tests.safe_load_worker import Payload
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.proc_failure import stderr_report

ERROR = "rosa-consolidate: error:"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
       "PYTHONWARNINGS": "ignore::FutureWarning"}  # c10d's deprecation notes would fill the stderr tail
STEP = "checkpoints/step-*"


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A one-process DCP run: ROSA on a tiny Llama after one AdamW step (model and optimizer state)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    apply_rosa(model, RosaConfig(rank=4))
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    root = tmp_path_factory.mktemp("one-rank")
    save_checkpoint(root, 3, model=model, module=model, optimizer=opt, tokenizer=tokenizer,
                    trainer_state={"engine": "local", "model_dtype": "float32", "config": {}})
    return root


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """FSDP2 (DCP) and ZeRO-3 runs of 2 gloo ranks, and what those ranks saw reading them (~25 s)."""
    outs = []

    def command(port: int) -> list[str]:
        outs.append(tmp_path_factory.mktemp("two-ranks"))
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "tests.safe_load_worker", "--out", str(outs[-1])]

    proc = run_ranks(command, env=ENV, timeout=300)
    assert proc.returncode == 0, stderr_report(proc)
    out = outs[-1]
    return {"fsdp2": out / "fsdp2", "zero3": out / "zero3", "out": out,
            "ranks": [json.loads((out / f"results-rank{r}.json").read_text()) for r in range(2)]}


def _run_copy(src: Path, dst: Path) -> tuple[Path, Path]:
    """A copy of a run and its checkpoint folder."""
    shutil.copytree(src, dst)
    return dst, next(dst.glob(STEP))


def _consolidate(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def _one_error(capsys, args, *fragments) -> str:
    """rosa-consolidate exits 2 with exactly one ``rosa-consolidate: error:`` line holding ``fragments``."""
    code = _consolidate(*args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _craft_deepspeed_file(file: Path, marker: Path) -> None:
    torch.save({"optimizer_state_dict": Payload(marker), "module": Payload(marker)}, file)


# --------------------------------------------------------------------------- the payloads are real

def test_payloads_run_through_the_plain_readers(one_rank, tmp_path):
    """What DCP and DeepSpeed do by themselves: each crafted file runs its command."""
    import torch.distributed.checkpoint as dcp
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from torch.distributed.checkpoint import FileSystemReader

    state = tmp_path / "state"
    shutil.copytree(next(one_rank.glob(STEP)) / "state", state)
    (state / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "metadata-ran")))
    with pytest.raises(AttributeError):  # pickle.load ran the command, then DCP found its exit status
        FileSystemReader(str(state)).read_metadata()
    assert (tmp_path / "metadata-ran").exists()

    dcp.save({"w": torch.ones(2), "extra": Payload(tmp_path / "item-ran")}, checkpoint_id=str(tmp_path / "items"),
             no_dist=True)
    assert not (tmp_path / "item-ran").exists()  # saving does not run it
    dcp.load({"w": torch.empty(2), "extra": None}, checkpoint_id=str(tmp_path / "items"), no_dist=True)
    assert (tmp_path / "item-ran").exists()  # DefaultLoadPlanner.load_bytes: torch.load(weights_only=False)

    _craft_deepspeed_file(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "ds-ran")
    TorchCheckpointEngine().load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert (tmp_path / "ds-ran").exists()


# --------------------------------------------------------------------------- crafted files are refused

@pytest.mark.parametrize("kind", ["one_rank", "fsdp2"])
def test_crafted_dcp_metadata_is_refused(one_rank, two_ranks, tmp_path, capsys, kind):
    run, ckpt = _run_copy(one_rank if kind == "one_rank" else two_ranks["fsdp2"], tmp_path / "run")
    metadata = ckpt / "state" / ".metadata"
    marker = tmp_path / "ran"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    for read in (lambda: read_dcp_metadata(ckpt / "state"), lambda: dcp_load({}, ckpt / "state", no_dist=True)):
        with pytest.raises(UnsafeCheckpointError, match="posix.system") as caught:
            read()
        assert str(metadata) in str(caught.value) and "\n" not in str(caught.value)
    _one_error(capsys, [run, tmp_path / "out"], str(metadata), "posix.system")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_crafted_dcp_item_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    dcp.save({"w": torch.ones(2), "extra": Payload(marker)}, checkpoint_id=str(tmp_path / "items"), no_dist=True)
    state = {"w": torch.empty(2), "extra": None}
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0.distcp \(item extra\): it would call posix.system"):
        dcp_load(state, tmp_path / "items", no_dist=True)
    assert not marker.exists()


@pytest.mark.parametrize("part", ["model_states", "optim_states"])
def test_crafted_deepspeed_file_is_refused(two_ranks, tmp_path, capsys, part):
    run, ckpt = _run_copy(two_ranks["zero3"], tmp_path / "run")
    file = ckpt / "deepspeed" / "state" / f"zero_pp_rank_1_mp_rank_00_{part}.pt"
    marker = tmp_path / "ran"
    _craft_deepspeed_file(file, marker)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        torch_load(file, map_location="cpu", mmap=True)
    _one_error(capsys, [run, tmp_path / "out"], str(file), "posix.system")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_refused_global_is_not_even_imported(tmp_path):
    """Importing a module named by a pickle can run code too: the allowlist is checked first."""
    (tmp_path / ".metadata").write_bytes(b"cthis\ns\n.")  # GLOBAL this.s (importing `this` prints a poem)
    assert "this" not in sys.modules
    with pytest.raises(UnsafeCheckpointError, match="it would call this.s"):
        read_dcp_metadata(tmp_path)
    assert "this" not in sys.modules


# --------------------------------------------------------------------------- real checkpoints still read

def test_real_dcp_checkpoints_read_identically(one_rank, two_ranks):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for run in (one_rank, two_ranks["fsdp2"]):
        state = next(run.glob(STEP)) / "state"
        metadata = read_dcp_metadata(state)
        assert metadata == pickle.loads((state / ".metadata").read_bytes())
    # the one-process checkpoint, every key: tensors and non-tensor optimizer items
    state = next(one_rank.glob(STEP)) / "state"
    metadata = read_dcp_metadata(state)
    ours = {k: torch.zeros(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
            for k, md in metadata.state_dict_metadata.items()}
    theirs = {k: v.clone() if v is not None else None for k, v in ours.items()}
    dcp_load(ours, state, no_dist=True)
    dcp.load(theirs, checkpoint_id=str(state), no_dist=True)
    assert any(v is not None and not torch.is_tensor(v) for v in ours.values())  # lr, betas, ... were read
    for key, value in theirs.items():
        assert (torch.equal(ours[key], value) if torch.is_tensor(value) else ours[key] == value), key


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


def test_real_deepspeed_files_read_identically(two_ranks):
    files = sorted(next(two_ranks["zero3"].glob(STEP)).glob("deepspeed/state/*.pt"))
    assert len(files) == 4
    for file in files:
        assert _same(torch_load(file, map_location="cpu", mmap=True),
                     torch.load(file, map_location="cpu", weights_only=False)), file.name


def test_deepspeed_allowlist_names_its_classes(tmp_path):
    """Each allowed DeepSpeed name still names its class (a rename would refuse real checkpoints);
    fp16's DynamicLossScaler, which CPU DeepSpeed cannot train with, round-trips too."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    assert {f"{c.__module__}.{c.__qualname__}" for c in (ZeroStageEnum, LossScaler, DynamicLossScaler)} \
        == set(DEEPSPEED_GLOBALS)
    state = {"zero_stage": ZeroStageEnum.weights, "static": LossScaler(scale=128.0),
             "dynamic": DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                          consecutive_hysteresis=False, dtype=torch.float16)}
    torch.save(state, tmp_path / "scalers.pt")
    assert _same(torch_load(tmp_path / "scalers.pt"), state)


MODEL0, OPTIM1 = "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
TWO_RANK_FAULTS = [  # worker case, error kind, the file its line names ({rank}: each rank's own)
    ("dcp_crafted_metadata", "Unsafe", "dcp-crafted-metadata/.metadata"),
    ("dcp_corrupt_rank1", "Corrupt", "dcp-corrupt-rank1/__1_0.distcp"),
    ("zero3_crafted_optim_rank1", "Unsafe", OPTIM1),
    ("zero3_crafted_model_rank0", "Unsafe", MODEL0),
    ("zero3_crafted_legacy_optims", "Unsafe", "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"),
    ("zero3_truncated_model_rank0", "Corrupt", MODEL0),
]


def test_two_rank_loads_agree_and_match(two_ranks):
    """Collective dcp_load and a protected ZeRO-3 resume give what plain loads give; a crafted or damaged
    file of one rank stops both ranks with the same line, and no payload runs."""
    for rank, seen in enumerate(two_ranks["ranks"]):
        assert seen["dcp_keys"] > 100 and seen["dcp_differ"] == [] and seen["dcp_logits_max_diff"] == 0.0
        assert seen["zero3_keys"] > 50 and seen["zero3_differ"] == [] and seen["zero3_logits_max_diff"] == 0.0
        assert set(seen["zero3_read_through_torch_load"]) == {  # DeepSpeed read this rank's files through it
            f"zero_pp_rank_{rank}_mp_rank_00_{part}_states.pt" for part in ("model", "optim")}
        assert seen["force_weights_only_after"] is None
        for case, kind, file in TWO_RANK_FAULTS:
            outcome = seen[case]
            assert outcome["type"] == f"{kind}CheckpointError", (rank, case, outcome)
            assert file.format(rank=rank) in outcome["message"] and "\n" not in outcome["message"], (rank, outcome)
    assert not list(two_ranks["out"].glob("marker-*"))


# --------------------------------------------------------------------------- OUT is the source

@pytest.mark.parametrize("where", ["the checkpoint", "checkpoints/", "the run", "the run's parent", "in checkpoints/",
                                   "in the checkpoint", "a link to the run"])
def test_force_never_replaces_its_source(one_rank, tmp_path, capsys, where):
    run, ckpt = _run_copy(one_rank, tmp_path / "runs" / "x")
    out = {"the checkpoint": ckpt, "checkpoints/": run / "checkpoints", "the run": run,
           "the run's parent": tmp_path / "runs", "in checkpoints/": run / "checkpoints" / "hf",
           "in the checkpoint": ckpt / "model", "a link to the run": tmp_path / "link"}[where]
    if where == "a link to the run":
        out.symlink_to(run)
    before = _snapshot(tmp_path)
    _one_error(capsys, [run, out, "--force"], f"OUT {out} ", "which it is made from")
    assert _snapshot(tmp_path) == before


def test_force_into_the_run_folder_works(one_rank, tmp_path, capsys):
    """``<run>/hf`` (outside checkpoints/) is where the README writes it; --force replaces it there."""
    run, ckpt = _run_copy(one_rank, tmp_path / "run")
    (run / "hf").mkdir()
    (run / "hf" / "old.txt").write_text("old")
    checkpoints = _snapshot(run / "checkpoints")
    assert _consolidate(ckpt, run / "hf", "--force") == 0, capsys.readouterr().err
    assert (run / "hf" / "model.safetensors").is_file() and not (run / "hf" / "old.txt").exists()
    assert _snapshot(run / "checkpoints") == checkpoints


# --------------------------------------------------------------------------- damaged or missing parts

def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _zero_middle(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[64:] = bytes(len(data) - 64)  # same size: only reading it shows the damage
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, part, fragment", [
    (_truncate, "state/__0_0.distcp", "is truncated"),
    (_zero_middle, "state/__0_0.distcp", "cannot read"),
    (Path.unlink, "state/.metadata", "is missing"),
    (lambda f: f.write_bytes(b"garbage\n"), "state/.metadata", "cannot read"),
    (_truncate, "state/.metadata", "cannot read"),
])
def test_damaged_dcp_part(one_rank, tmp_path, capsys, damage, part, fragment):
    run, ckpt = _run_copy(one_rank, tmp_path / "run")
    damage(ckpt / part)
    _one_error(capsys, [run, tmp_path / "out"], str(ckpt / part), fragment)
    assert not (tmp_path / "out").exists()
    with pytest.raises((CorruptCheckpointError, UnsafeCheckpointError)):
        dcp_load({"model.lm_head.weight": torch.empty(0)}, ckpt / "state", no_dist=True)


@pytest.mark.parametrize("part", ["model_states", "optim_states"])
def test_damaged_deepspeed_part(two_ranks, tmp_path, capsys, part):
    run, ckpt = _run_copy(two_ranks["zero3"], tmp_path / "run")
    file = ckpt / "deepspeed" / "state" / f"zero_pp_rank_0_mp_rank_00_{part}.pt"
    _truncate(file)
    _one_error(capsys, [run, tmp_path / "out"], str(file), "cannot read")
    assert not (tmp_path / "out").exists()
