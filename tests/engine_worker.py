"""A short ROSA fine-tune of a tiny Llama: whole (one process), FSDP2 or ZeRO-3 (torchrun).

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

STEPS, EVERY, GLOBAL_BATCH, SEQ, LR = 9, 3, 4, 16, 2e-3


def _full(t):
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.data.detach().clone()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def merged_state(model) -> dict[str, torch.Tensor]:
    """Every parameter of the merged model as a full fp32 tensor (collective under FSDP2)."""
    layers = rosa_layers(model)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith((".up", ".down")) and name.rsplit(".", 1)[0] in layers:
            continue
        owner = name.rsplit(".", 2)[0] if name.endswith("base.weight") else None
        full = _full(p).float()
        if owner in layers:
            layer = layers[owner]
            full = full + _full(layer.up).float() @ _full(layer.down).float()
            name = owner + ".weight"
        out[name.replace(".base.", ".")] = full
    return out


def _zero3_master_facts(model, step_, batch) -> dict:
    """After a resample the optimizer's fp32 masters must hold the new factors and zero moments,
    so the next step moves the factors by about one learning rate from their new values."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt_params = adapter_parameters(model)
    loss = model(input_ids=batch, labels=batch).loss
    step_(loss)
    zero_opt = opt_params[0]._z3_optimizer
    resample(model, zero_opt)
    new = {id(p): _full(p).float() for p in opt_params}
    steps = [float(zero_opt.optimizer.state[flat]["step"]) for flat in zero_opt.fp32_partitioned_groups_flat]
    facts = {
        "master_minus_param": max((safe_get_full_fp32_param(p) - new[id(p)]).abs().max().item() for p in opt_params),
        "param_scale": max(new[id(p)].abs().max().item() for p in opt_params),
        "moments_after_resample": max(safe_get_full_optimizer_state(p, k).abs().max().item()
                                      for p in opt_params for k in ("exp_avg", "exp_avg_sq")),
    }
    facts["group_steps_after_resample"] = steps
    step_(model(input_ids=batch, labels=batch).loss)
    facts["first_step_move"] = max((_full(p).float() - new[id(p)]).abs().max().item() for p in opt_params)
    return facts


LONG_RUN = 10_000  # Adam's step after a long run: its bias corrections are then exactly 1
REWARM_LR = 1e-5  # small, so the fixed batch's gradient stays nearly constant for the whole window


def _rewarm_variant(layout: str, rewarm: int, beta2: float, batch) -> dict:
    """ZeRO-3 with the final norm trainable besides the factors, in the factors' optimizer param group
    (``same-group``) or its own (``own-group``). A resample after LONG_RUN steps zeroes the factors'
    Adam moments; whether their bias correction restarts too depends on DeepSpeed's step, kept per
    flat sub-group. Records the steps, and per update after the resample the median and max over the
    factors' fp32 master elements of |delta| / REWARM_LR (a fresh Adam on a constant gradient: 1)."""
    import deepspeed

    from rosa_scale.schedule import lr_factor

    rank, size = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(vocab_size=300).train()
    model.config.use_cache = False
    apply_rosa(model, RosaConfig(rank=4, seed=3), split=False)
    norm = model.model.norm.weight.requires_grad_(True)
    factors = adapter_parameters(model)
    groups = [{"params": factors}, {"params": [norm]}] if layout == "own-group" else [{"params": [*factors, norm]}]
    # own-group also spreads the factors over several DeepSpeed sub-groups: each keeps its own step
    zero = {"stage": 3, **({"sub_group_size": 1000} if layout == "own-group" else {})}
    ds_config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // size, "gradient_accumulation_steps": 1,
                 "zero_optimization": zero, "zero_allow_untested_optimizer": True,
                 "gradient_clipping": 0.0, "steps_per_print": 10**9}
    inner = torch.optim.AdamW(groups, lr=REWARM_LR, betas=(0.9, beta2), weight_decay=0.0)
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, config=ds_config, optimizer=inner)
    resample(engine, zero_opt, index=0)

    def step_(lr):
        for g in inner.param_groups:
            g["lr"] = lr
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()

    for _ in range(2):  # moments to reset
        step_(REWARM_LR)
    for flat in zero_opt.fp32_partitioned_groups_flat:  # fixture: as if LONG_RUN steps had passed
        inner.state[flat]["step"].fill_(LONG_RUN)
    resample(engine, zero_opt)
    ids = {id(p) for p in factors}
    sub_groups = [{"factors": all(id(q) in ids for q in sub), "step": float(inner.state[flat]["step"])}
                  for sub, flat in zip(zero_opt.fp16_groups, zero_opt.fp32_partitioned_groups_flat)]
    slices = [(*zero_opt.grad_position[zero_opt.get_param_id(p)], p.ds_numel) for p in factors]

    def masters():  # this rank's fp32 master elements of the factors; NaN for the partition padding
        parts = []
        for i, offset, n, numel in slices:
            part = zero_opt.fp32_partitioned_groups_flat[i].narrow(0, offset, n).clone()
            part[max(0, min(n, numel - rank * n)):] = float("nan")
            parts.append(part)
        return torch.cat(parts)

    scale = masters().nan_to_num().abs().max()
    dist.all_reduce(scale, op=dist.ReduceOp.MAX)
    median, largest, factors_used = [], [], []
    for k in range(rewarm + 15):  # past the re-warmup: the stale bias correction costs most at its end
        f = lr_factor(LONG_RUN + k, total_steps=10 * LONG_RUN, warmup_steps=0, schedule="constant",
                      resample_every=LONG_RUN, rewarm_steps=rewarm)
        before = masters()
        step_(REWARM_LR * f)
        move = (masters() - before).abs() / REWARM_LR
        everyone = [torch.empty_like(move) for _ in range(size)]
        dist.all_gather(everyone, move)
        move = torch.cat(everyone)
        move = move[~move.isnan()]
        median.append(move.median().item())
        largest.append(move.max().item())
        factors_used.append(f)
    engine.destroy()
    return {"sub_groups": sub_groups, "master_scale": scale.item(), "median_update_over_lr": median, "max_update_over_lr": largest,
            "lr_factor": factors_used}


def rewarm_experiment(variants: list[str]) -> dict:
    import deepspeed

    deepspeed.init_distributed("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(0, 300, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    batch = batch[rank * (GLOBAL_BATCH // size):(rank + 1) * (GLOBAL_BATCH // size)]
    facts = {}
    for variant in variants:  # LAYOUT[:REWARM_STEPS[:BETA2]]
        layout, rewarm, beta2 = variant.split(":") + ["0", "0.999"][variant.count(":"):]
        facts[variant] = _rewarm_variant(layout, int(rewarm), float(beta2), batch)
    return facts


def _to_cpu(value):
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value.cpu() if torch.is_tensor(value) else value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["local", "fsdp2", "zero3"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--bf16", action="store_true", help="zero3 only: bf16 params, fp32 master copies")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--extra-trainable", nargs="+", metavar="VARIANT",
                        help="zero3 on CPU only: instead of the fine-tune, measure the updates after a resample "
                             "with the final norm also trainable, per VARIANT: own-group, same-group or "
                             "same-group:R[:BETA2] (learning-rate re-warmup of R steps, Adam's beta2; default 0.999)")
    args = parser.parse_args()
    if args.extra_trainable:
        facts = rewarm_experiment(args.extra_trainable)
        if dist.get_rank() == 0:
            torch.save(facts, args.out)
        dist.barrier()
        dist.destroy_process_group()
        return
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=300).train()
    model.config.use_cache = False
    ids = torch.randint(0, 300, (STEPS + 2, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    cfg = RosaConfig(rank=4, method=args.method, seed=3)
    rank, size = 0, 1
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons across engines
        torch.backends.cudnn.allow_tf32 = False
        model.to("cuda")
        ids = ids.cuda()
    if args.mode == "fsdp2":
        dist.init_process_group(backend)
        rank, size = dist.get_rank(), dist.get_world_size()
        from rosa_scale.engines.fsdp2 import shard_model

        apply_rosa(model, cfg, split=False)
        shard_model(model, param_dtype=None, reduce_dtype=None)
        resample(model, index=0)
    elif args.mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(backend)
        rank, size = dist.get_rank(), dist.get_world_size()
        apply_rosa(model, cfg, split=False)
        ds_config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // size, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                     "bf16": {"enabled": args.bf16}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
        engine, opt, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                 optimizer=torch.optim.AdamW(adapter_parameters(model), lr=LR, weight_decay=0.0))
        resample(engine, opt, index=0)  # DeepSpeed built optimizer state at init: restart it
    else:
        apply_rosa(model, cfg)
    per_rank = GLOBAL_BATCH // size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    facts = {"engine": engine_for(model).name, "world_size": size}
    if args.mode != "zero3":
        opt = torch.optim.AdamW(adapter_parameters(model), lr=LR, weight_decay=0.0)
    adapters = {id(p) for p in adapter_parameters(model)}

    def step_(loss):
        if args.mode == "zero3":
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()

    with torch.no_grad():
        facts["logits_before_resample"] = model(input_ids=ids[-1, mine]).logits
    losses = []
    for step in range(STEPS):
        batch = ids[step, mine]
        loss = model(input_ids=batch, labels=batch).loss
        step_(loss)
        total = loss.detach().clone()
        if size > 1:
            dist.all_reduce(total)
            total /= size
        losses.append(total.item())
        if step == 0 and args.mode != "zero3":
            facts["state_only_adapters"] = set(map(id, opt.state)) == adapters
            facts["state_is_sharded"] = all(type(s["exp_avg"]).__name__ == "DTensor" for s in opt.state.values())
        if (step + 1) % EVERY == 0:
            with torch.no_grad():
                before = model(input_ids=ids[-1, mine]).logits
            resample(model, opt)
            with torch.no_grad():
                after = model(input_ids=ids[-1, mine]).logits
            facts.setdefault("resample_logit_diff", []).append((after - before).abs().max().item())
            if args.mode != "zero3":
                facts.setdefault("state_after_resample", []).append(
                    sum(len(opt.state[p]) for p in adapter_parameters(model)))
    facts["losses"] = losses
    facts["merged"] = merged_state(model)
    facts["split_index"] = model.rosa_state.split_index
    if args.mode == "zero3":  # after the comparison above: it trains one more step
        facts.update(_zero3_master_facts(model, step_, ids[-2, mine]))
    if rank == 0:
        torch.save(_to_cpu(facts), args.out)
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
