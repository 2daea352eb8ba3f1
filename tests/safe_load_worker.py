"""Checkpoint files read by 2 gloo processes through ``rosa_scale.safe_load``, for
tests/test_faults_checkpoint_files.py.

    torchrun --nproc_per_node 2 -m tests.safe_load_worker --out DIR

Writes the FSDP2 (DCP, 2 ranks) and DeepSpeed ZeRO-3 checkpoints of ``tests/ds_checkpoint_worker``
to ``DIR/fsdp2`` and ``DIR/zero3``, then, on both ranks:

- loads the DCP checkpoint collectively with ``dcp_load`` into a fresh FSDP2 model and optimizer,
  compares every value with a plain ``dcp.load`` and the model's logits with the saved ones;
- loads copies with a crafted ``.metadata`` and with one rank's ``.distcp`` overwritten (its size
  kept, so only that rank's read fails): every rank must get the same one-line error;
- resumes a fresh ZeRO-3 engine under ``protect_deepspeed_engine`` and compares logits, fp32 masters
  and Adam moments with a plain DeepSpeed load; then loads copies with a crafted model-states or
  optim-states file of one rank, and a truncated one.

Each rank writes ``DIR/results-rank{r}.json``; the crafted payloads would touch ``DIR/marker-*``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from rosa_scale import adapter_parameters, apply_rosa
from rosa_scale import safe_load
from rosa_scale.safe_load import dcp_load, protect_deepspeed_engine
from tests.ds_checkpoint_worker import CONFIG, fsdp2_checkpoint, zero3_checkpoint
from tests.tiny import tiny_llama, tiny_tokenizer

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
             "gradient_clipping": 0.0, "steps_per_print": 10**9}


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _outcome(fn) -> dict:
    try:
        fn()
    except Exception as err:
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None, "message": None}


def _copy(src: Path, dst: Path, change) -> Path:
    """Rank 0 copies ``src`` to ``dst`` and applies ``change(dst)``; every rank waits for it."""
    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
        change(dst)
    dist.barrier()
    return dst


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp2_model(tokenizer):
    from rosa_scale.engines.fsdp2 import shard_model

    model = tiny_llama(len(tokenizer), seed=5)  # other values than the checkpoint's: the load must set them
    model.config.use_cache = False
    apply_rosa(model, CONFIG, split=False)
    shard_model(model, param_dtype=None, reduce_dtype=None)
    return model, torch.optim.AdamW(adapter_parameters(model), lr=1e-2)


def dcp_checks(run: Path, tokenizer, out: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = next(run.glob("checkpoints/step-*")) / "state"
    reference = torch.load(run / "reference.pt")
    results = {}

    safe_model, safe_opt = _fsdp2_model(tokenizer)
    plain_model, plain_opt = _fsdp2_model(tokenizer)
    safe = dict(zip(("model", "optim"), get_state_dict(safe_model, safe_opt)))
    plain = dict(zip(("model", "optim"), get_state_dict(plain_model, plain_opt)))
    dcp_load(safe, state, no_dist=False)
    dcp.load(plain, checkpoint_id=str(state))
    flat_safe, flat_plain = (flatten_state_dict(holder)[0] for holder in (safe, plain))
    results["dcp_keys"] = len(flat_safe)
    results["dcp_differ"] = sorted(k for k in flat_plain if not (
        torch.equal(_full(flat_safe[k]), _full(flat_plain[k])) if torch.is_tensor(flat_plain[k])
        else flat_safe[k] == flat_plain[k]))
    set_state_dict(safe_model, safe_opt, model_state_dict=safe["model"], optim_state_dict=safe["optim"])
    with torch.no_grad():
        logits = safe_model.eval()(input_ids=reference["ids"]).logits
    results["dcp_logits_max_diff"] = (logits - reference["logits"]).abs().max().item()

    crafted = _copy(state, out / "dcp-crafted-metadata",
                    lambda d: (d / ".metadata").write_bytes(pickle.dumps(Payload(out / "marker-dcp-metadata"))))

    def corrupt_rank1(d: Path):
        data = bytearray((d / "__1_0.distcp").read_bytes())
        data[64:] = bytes(len(data) - 64)  # same size: the metadata check passes, reading fails
        (d / "__1_0.distcp").write_bytes(bytes(data))

    corrupt = _copy(state, out / "dcp-corrupt-rank1", corrupt_rank1)
    for name, folder in (("dcp_crafted_metadata", crafted), ("dcp_corrupt_rank1", corrupt)):
        model, opt = _fsdp2_model(tokenizer)
        holder = dict(zip(("model", "optim"), get_state_dict(model, opt)))
        results[name] = _outcome(lambda: dcp_load(holder, folder, no_dist=False))
    return results


def _zero3_engine(tokenizer):
    import deepspeed

    model = tiny_llama(len(tokenizer), seed=5, tie_word_embeddings=True).train()
    model.config.use_cache = False
    apply_rosa(model, CONFIG, split=False)
    engine, opt, _, _ = deepspeed.initialize(model=model, config=DS_CONFIG,
                                             optimizer=torch.optim.AdamW(adapter_parameters(model), lr=1e-2))
    return engine, opt


def _zero3_state(engine) -> dict[str, torch.Tensor]:
    """fp32 masters and Adam moments of the factors, full (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[name] = safe_get_full_fp32_param(p)
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key)
    return out


def zero3_checks(run: Path, tokenizer, out: Path) -> dict:
    ckpt = next(run.glob("checkpoints/step-*")) / "deepspeed"
    reference = torch.load(run / "reference.pt")
    load = dict(tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)  # as checkpoint.py
    results = {}

    plain, _ = _zero3_engine(tokenizer)
    plain.load_checkpoint(str(ckpt), **load)
    safe, _ = _zero3_engine(tokenizer)
    protect_deepspeed_engine(safe)
    reads, real_torch_load = [], safe_load.torch_load

    def counting(path, **kwargs):
        reads.append(Path(path).name)
        return real_torch_load(path, **kwargs)

    safe_load.torch_load = counting
    try:
        safe.load_checkpoint(str(ckpt), **load)
    finally:
        safe_load.torch_load = real_torch_load
    results["zero3_read_through_torch_load"] = sorted(reads)
    a, b = _zero3_state(safe), _zero3_state(plain)
    results["zero3_keys"] = len(a)
    results["zero3_differ"] = sorted(k for k in b if not torch.equal(a[k], b[k]))
    safe.eval()
    with torch.no_grad():
        logits = safe(input_ids=reference["ids"]).logits
    results["zero3_logits_max_diff"] = (logits - reference["logits"]).abs().max().item()

    def replace(names: list[str], marker: str, zipped=True):
        def change(d: Path):
            for name in names:
                torch.save({"optimizer_state_dict": Payload(out / marker), "module": Payload(out / marker)},
                           d / "state" / name, _use_new_zipfile_serialization=zipped)
        return change

    def truncate(d: Path):
        file = d / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    optims = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    cases = {"zero3_crafted_optim_rank1": replace(optims[1:], "marker-zero3-optim"),
             "zero3_crafted_model_rank0": replace(["zero_pp_rank_0_mp_rank_00_model_states.pt"], "marker-zero3-model"),
             # a legacy (non-zip) torch.save is not scanned up front: DeepSpeed's own read refuses it, on each rank
             "zero3_crafted_legacy_optims": replace(optims, "marker-zero3-legacy", zipped=False),
             "zero3_truncated_model_rank0": truncate}
    for name, change in cases.items():
        folder = _copy(ckpt, out / name, change)
        results[name] = _outcome(lambda: safe.load_checkpoint(str(folder), **load))
    results["force_weights_only_after"] = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    dist.init_process_group("gloo")
    tokenizer = tiny_tokenizer()
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    fsdp2_checkpoint(out / "fsdp2", tokenizer, ids)
    zero3_checkpoint(out / "zero3", tokenizer, ids)  # initializes DeepSpeed's comm on the same group
    results = {**dcp_checks(out / "fsdp2", tokenizer, out), **zero3_checks(out / "zero3", tokenizer, out)}
    (out / f"results-rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
