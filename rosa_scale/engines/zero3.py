"""DeepSpeed ZeRO-3 (partitioned parameters): owner-planned resample through DeepSpeed's own APIs.

Three copies must change together at a resample, or the edit is silently lost:
- the frozen ``w_fixed`` partitions: written under ``GatheredParameters(..., modifier_rank=owner)``;
- the ``up``/``down`` partitions the forward uses: written the same way;
- the optimizer's fp32 master partitions of ``up``/``down``: ``safe_set_full_fp32_param`` with the
  same full value on every rank (otherwise the next step restores the old factors).
Adam moments are zeroed with ``safe_set_full_optimizer_state``. DeepSpeed counts Adam's ``step``
per flat group, so it cannot restart per parameter: the first steps after a resample see
bias-corrected moments of a fresh start (an update ~3x the usual size); ``rewarm_steps``
(learning-rate re-warmup after each resample) is the remedy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..factorize import window_generator
from ..layer import resplit_values
from .local import world
from .plan import owner_queues


def is_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


class Zero3Engine:
    name = "zero3"

    @torch.no_grad()
    def resplit(self, model, layers, index: int, config) -> None:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        size, rank = world()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        queues = owner_queues({n: (l.out_features, l.in_features) for n, l in layers.items()}, size)
        for step in range(max(len(q) for q in queues)):
            round_ = [(r, q[step]) for r, q in enumerate(queues) if step < len(q)]
            mine = None
            for owner, name in round_:  # gather the round's matrices; each rank keeps the one it owns
                layer = layers[name]
                with deepspeed.zero.GatheredParameters([layer.weight_param]):
                    w = layer.weight_param.data.clone() if owner == rank else None
                # the factors as the optimizer holds them (fp32 masters), else as the forward sees them
                factors = []
                for p in (layer.up, layer.down):
                    if hasattr(p, "_z3_optimizer"):
                        factors.append(safe_get_full_fp32_param(p))
                    else:
                        with deepspeed.zero.GatheredParameters([p]):
                            factors.append(p.data.float().clone())
                if owner == rank:
                    mine = (name, w, *factors)
                del w, factors
            new = None
            if mine is not None:  # every owner factorizes at the same time
                name, w, up, down = mine
                layer = layers[name]
                new = resplit_values(w, up, down, transposed=layer.transposed, rank=layer.rank, config=config,
                                     generator=window_generator(config.seed, index, name))
                del mine, w, up, down
            for owner, name in round_:
                layer = layers[name]
                params = [layer.weight_param, layer.up, layer.down]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=owner):
                    if owner == rank:
                        for p, value in zip(params, new):
                            p.data.copy_(value)
                for i, p in enumerate((layer.up, layer.down)):
                    if not hasattr(p, "_z3_optimizer"):  # no optimizer yet: no master copy to update
                        continue
                    value = new[1 + i].to(device) if owner == rank else \
                        torch.empty(p.ds_shape, dtype=torch.float32, device=device)
                    dist.broadcast(value, src=owner)  # the API wants the same full value on every rank
                    safe_set_full_fp32_param(p, value)
            del new

    def reset_optimizer_state(self, optimizer, params) -> None:
        """Zero the Adam moments of ``params`` in DeepSpeed's fp32 partitions, and restart the step
        count of every flat group whose parameters are all being reset (a full resample resets them
        all, which makes the next step identical to a fresh optimizer's)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        params = list(params)
        zero_opt = getattr(params[0], "_z3_optimizer", None) if params else None
        if zero_opt is None:
            return
        inner = zero_opt.optimizer
        for p in params:
            group = zero_opt.grad_position[zero_opt.get_param_id(p)][0]
            if "exp_avg" not in inner.state.get(zero_opt.fp32_partitioned_groups_flat[group], {}):
                continue  # the optimizer has not stepped yet: no state to reset
            zeros = torch.zeros(p.ds_shape, dtype=torch.float32, device=p.ds_tensor.device)
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, zeros, key)
        ids = {id(p) for p in params}
        for group_params, flat, group in zip(zero_opt.fp16_groups, zero_opt.fp32_partitioned_groups_flat,
                                             inner.param_groups):
            if not all(id(q) in ids for q in group_params):
                continue  # partly reset: step stays; use rewarm_steps to tame the first updates
            state = inner.state.get(flat, {})
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
            if "step" in group:
                group["step"] = 0
