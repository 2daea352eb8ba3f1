"""Two real multi-rank checkpoints for rosa-consolidate's tests, written by one 2-process launch.

    torchrun --nproc_per_node 2 -m tests.ds_checkpoint_worker --out DIR

- ``DIR/fsdp2/``: a tiny Llama under FSDP2 (gloo), one training step, then a DCP checkpoint
  written by both ranks (``state/__0_0.distcp``, ``state/__1_0.distcp``);
- ``DIR/zero3/``: a tiny Llama with tied embeddings under DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu),
  one training step, then DeepSpeed's own checkpoint (``deepspeed/state/``, one pair of files per rank).

Both are written by ``rosa_scale.checkpoint.save_checkpoint``, as rosa-train writes them. Each run
folder also holds ``reference.pt``: input ids and the ROSA model's logits on them after the step,
computed by the sharded model itself.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, resample
from rosa_scale.checkpoint import save_checkpoint
from tests.tiny import tiny_llama, tiny_tokenizer

STEP = 1
CONFIG = RosaConfig(rank=4, seed=3)


def _save(run: Path, tokenizer, *, model, module, optimizer, engine: str) -> None:
    save_checkpoint(run, STEP, model=model, module=module, optimizer=optimizer, tokenizer=tokenizer,
                    trainer_state={"engine": engine, "model_dtype": "float32", "config": {"rosa": vars(CONFIG)}})


def fsdp2_checkpoint(run: Path, tokenizer, ids: torch.Tensor) -> None:
    from rosa_scale.engines.fsdp2 import shard_model

    rank = dist.get_rank()
    model = tiny_llama(len(tokenizer)).train()
    model.config.use_cache = False
    apply_rosa(model, CONFIG, split=False)
    shard_model(model, param_dtype=None, reduce_dtype=None)
    resample(model, index=0)
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    mine = ids[rank:rank + 1]
    model(input_ids=mine, labels=mine).loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    model.reshard()
    _save(run, tokenizer, model=model, module=model, optimizer=opt, engine="fsdp2")
    if rank == 0:
        torch.save({"ids": ids, "logits": logits}, run / "reference.pt")
    dist.barrier()


def zero3_checkpoint(run: Path, tokenizer, ids: torch.Tensor) -> None:
    import importlib

    import deepspeed

    # DeepSpeed would compile (~30 s) a shared-memory all-reduce op for CPU ranks; its gloo fallback
    # (what it uses where the op cannot build) is all a checkpoint needs. (The attribute
    # deepspeed.comm.torch is the torch package itself, hence import_module.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(len(tokenizer), seed=1, tie_word_embeddings=True).train()
    model.config.use_cache = False
    apply_rosa(model, CONFIG, split=False)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                 "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                             optimizer=torch.optim.AdamW(adapter_parameters(model), lr=1e-2))
    resample(engine, opt, index=0)
    mine = ids[rank:rank + 1]
    engine.backward(engine(input_ids=mine, labels=mine).loss)
    engine.step()
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids).logits
    _save(run, tokenizer, model=engine, module=engine.module, optimizer=opt, engine="zero3")
    if rank == 0:
        torch.save({"ids": ids, "logits": logits}, run / "reference.pt")
    assert size == 2
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    dist.init_process_group("gloo")
    tokenizer = tiny_tokenizer()
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    fsdp2_checkpoint(out / "fsdp2", tokenizer, ids)
    zero3_checkpoint(out / "zero3", tokenizer, ids)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
