"""A short ROSA fine-tune of a tiny Llama, run whole (one process) or under FSDP2 (torchrun).

Writes what the tests compare: merged full weights, losses, logits around a resample, and
facts about optimizer state, to the path given.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, resample, rosa_layers
from rosa_scale.engines import engine_for
from tests.tiny import tiny_llama

STEPS, EVERY, GLOBAL_BATCH, SEQ = 9, 3, 4, 16


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def merged_state(model) -> dict[str, torch.Tensor]:
    """Every parameter of the merged model as a full fp32 tensor (collective under FSDP2)."""
    layers = rosa_layers(model)
    out = {}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 2)[0] if name.endswith(("base.weight", ".up", ".down")) else None
        if owner in layers and not name.endswith("base.weight"):
            continue
        full = _full(p).float()
        if owner in layers:
            layer = layers[owner]
            full = full + _full(layer.up).float() @ _full(layer.down).float()
            name = owner + ".weight"
        out[name.replace(".base.", ".")] = full
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["local", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="svd")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=300).train()
    model.config.use_cache = False
    ids = torch.randint(0, 300, (STEPS + 2, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    cfg = RosaConfig(rank=4, method=args.method, seed=3)
    rank, size = 0, 1
    if args.mode == "fsdp2":
        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        from rosa_scale.engines.fsdp2 import shard_model

        apply_rosa(model, cfg, split=False)
        shard_model(model, param_dtype=None, reduce_dtype=None)
        resample(model, index=0)
    else:
        apply_rosa(model, cfg)
    per_rank = GLOBAL_BATCH // size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    facts = {"engine": engine_for(model).name, "world_size": size}
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    adapters = {id(p) for p in adapter_parameters(model)}

    with torch.no_grad():
        facts["logits_before_resample"] = model(input_ids=ids[-1, mine]).logits
    losses = []
    for step in range(STEPS):
        batch = ids[step, mine]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if size > 1:
            dist.all_reduce(total)
            total /= size
        losses.append(total.item())
        if step == 0:
            facts["state_only_adapters"] = set(map(id, opt.state)) == adapters
            facts["state_is_sharded"] = all(type(s["exp_avg"]).__name__ == "DTensor" for s in opt.state.values())
        if (step + 1) % EVERY == 0:
            with torch.no_grad():
                before = model(input_ids=ids[-1, mine]).logits
            resample(model, opt)
            with torch.no_grad():
                after = model(input_ids=ids[-1, mine]).logits
            facts.setdefault("resample_logit_diff", []).append((after - before).abs().max().item())
            facts.setdefault("state_after_resample", []).append(sum(len(opt.state[p]) for p in adapter_parameters(model)))
    facts["losses"] = losses
    facts["merged"] = merged_state(model)
    facts["split_index"] = model.rosa_state.split_index
    if rank == 0:
        torch.save(facts, args.out)
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
