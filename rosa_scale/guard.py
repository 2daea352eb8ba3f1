"""Keep non-finite numbers out of everything a run keeps: checks that all ranks agree on.

A loss or gradient that is NaN or infinite stops the run (or skips the step, a bounded number of
times) before the optimizer applies it; factors are checked again before a checkpoint or an export
is written and before a resample folds them into the frozen weights. Each check is local work on
this rank's tensors (shards or partitions) and one small all-reduce, so every rank reaches the same
decision at the same point.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


DIVERGED_EXIT = 3  # rosa-train's exit status when a run stops on non-finite values


class DivergedError(RuntimeError):
    """The run produced non-finite values; the message names the step or the module."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: an FSDP2 shard, a ZeRO-3 partition, or the tensor itself."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    if hasattr(t, "to_local"):
        return t.to_local()
    return t


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nonfinite(value: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on ``value``'s device: whether any element is NaN or infinite (no sync)."""
    return ~torch.isfinite(value.detach()).all()


def nonfinite_grads(params) -> torch.Tensor | None:
    """Whether any local gradient of ``params`` holds NaN or inf, as a 0-dim bool tensor (no sync);
    one fused norm per tensor list rather than a reduction per parameter."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    return ~torch.isfinite(torch.stack(norms)).all()


def agree(device: torch.device, *flags) -> list[bool]:
    """Each flag (a bool, a 0-dim tensor or None for False) true on any rank -> true on all ranks.
    One all-reduce and one host sync for all of them."""
    values = torch.stack([f.to(device=device, dtype=torch.float32).reshape(()) if isinstance(f, torch.Tensor)
                          else torch.tensor(float(bool(f)), device=device) for f in flags])
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


@torch.no_grad()
def nonfinite_layers(layers: dict) -> list[str]:
    """ROSA layers whose weight, factors or merged weight ``w_fixed + up @ down`` hold NaN or inf on any
    rank, each named with the culprit; every rank gets the same list (a collective when distributed).

    The merged weight is never formed: with ``a = max|w_fixed|`` and ``b, c`` those of ``up`` and
    ``down``, every merged entry is at most ``a + r b c``, so it is finite in the weight's dtype when
    that bound is (a sufficient test, exact for any weight a trained model can hold). Per tensor this
    is one max over the local shard, and one all-reduce for all of them."""
    names = list(layers)
    if not names:
        return []
    peaks = []
    for layer in layers.values():
        for tensor in (layer.weight_param, layer.up, layer.down):
            local = _local(tensor)
            peak = local.detach().abs().amax().float() if local.numel() else torch.zeros((), device=local.device)
            peaks.append(torch.nan_to_num(peak, nan=float("inf"), posinf=float("inf")).to(peaks[0].device if peaks else local.device))
    values = torch.stack(peaks)
    if _distributed():
        if dist.get_backend() == "nccl" and values.device.type != "cuda":
            values = values.cuda()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    values = values.double().cpu().view(-1, 3).tolist()
    bad = []
    for name, layer, (w, up, down) in zip(names, layers.values(), values):
        culprit = next((which for which, v in (("weight", w), ("up", up), ("down", down)) if v == float("inf")), None)
        if culprit is None and w + layer.rank * up * down > torch.finfo(layer.weight_param.dtype).max:
            culprit = "w_fixed + up @ down overflows"
        if culprit:
            bad.append(f"{name} ({culprit})")
    return bad


def check_layers(layers: dict, what: str) -> None:
    """Raise ``DivergedError`` naming the first layer with non-finite values before ``what``."""
    bad = nonfinite_layers(layers)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DivergedError(f"{what} refused: non-finite values in {bad[0]}{more}")
