"""DeepSpeed ZeRO-3 (partitioned parameters): owner-planned resample through DeepSpeed's own APIs.

Three copies must change together at a resample, or the edit is silently lost:
- the frozen ``w_fixed`` partitions: written under ``GatheredParameters(..., modifier_rank=owner)``;
- the ``up``/``down`` partitions the forward uses: written the same way;
- the optimizer's fp32 master partitions of ``up``/``down``: ``safe_set_full_fp32_param`` with the
  same full value on every rank (otherwise the next step restores the old factors).
Adam moments are zeroed with ``safe_set_full_optimizer_state``. DeepSpeed counts Adam's ``step``
per flat (sub-)group, not per parameter, so it restarts only where every parameter of a flat group
is reset. Keep the factors in their own optimizer param group (rosa-train does): a resample is
then exactly a fresh Adam for them. If they share a group with other trainable parameters, the
step stays and the zeroed moments get no bias correction: the k-th update is
(1-b1^k)/sqrt(1-b2^k) times the learning rate (3.2x at k=1, 6.6x at k=12 for AdamW's betas),
and still 1.26x after 1/(1-b2) steps. The remedy is then ``rewarm_steps`` of about 1/(1-b2)
(1000 for AdamW's default: updates then stay <= 1.26x by the formula, 1.27x measured on the
tiny test model), with ``resample_every`` above it; tested (scaled to b2=0.99) in
tests/test_engines.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..factorize import window_generator
from ..layer import resplit_values
from ..quant import refuse_quantized
from .local import world
from .plan import owner_queues


def is_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


class Zero3Engine:
    name = "zero3"

    @staticmethod
    def sync_gradients(model) -> None:
        """Nothing left to average: DeepSpeed reduces every gradient itself."""

    @torch.no_grad()
    def resplit(self, model, layers, index: int, config) -> None:
        refuse_quantized(layers, "DeepSpeed ZeRO-3")
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
        count of every flat sub-group whose parameters are all being reset (factors in their own
        param group: the next step is then identical to a fresh optimizer's)."""
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
        # DeepSpeed may split a param group into several flat sub-groups (sub_group_size), each with its step
        whole = [all(id(q) in ids for q in sub) for sub in zero_opt.fp16_groups]
        for reset, flat in zip(whole, zero_opt.fp32_partitioned_groups_flat):
            state = inner.state.get(flat, {})
            if reset and "step" in state:  # else partly reset: step stays (see the module docstring)
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
        for i, group in enumerate(inner.param_groups):  # optimizers that count per param group
            subs = [reset for s, reset in enumerate(whole) if zero_opt.sub_group_to_group_id[s] == i]
            if "step" in group and subs and all(subs):
                group["step"] = 0
