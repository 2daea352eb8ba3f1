"""RosaLinear: a frozen linear layer (holding ``w_fixed``) plus trainable factors ``up``, ``down``.

The wrapped layer is kept as it is (``nn.Linear`` or GPT-2's transposed ``Conv1D``) so merging
gives back the original module type, with the original parameter names and shapes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .factorize import merge, round_to, split
from .fused_linear import FusedRosaLinear, fused_dtype

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a supported linear layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if Conv1D and isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    raise TypeError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or Conv1D)")


def resolve_rank(rank: int | float, out_features: int, in_features: int) -> int:
    """An int rank as is; a float in (0, 1) as a fraction of min(out, in). Must stay below min(out, in)."""
    smaller = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int or a fraction in (0, 1), got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank < 1.0:
            raise ValueError(f"a fractional rank must be in (0, 1), got {rank}")
        rank = max(1, round(rank * smaller))
    if not 0 < rank < smaller:
        raise ValueError(
            f"rank {rank} is too large for a {out_features}x{in_features} layer: it must be below {smaller}"
        )
    return rank


class RosaLinear(nn.Module):
    """``base(x) + up(down(x))``: ``base`` holds the frozen residual, ``up``/``down`` are trained.

    Right after construction ``up`` and ``down`` are zero and ``base`` holds the original weight,
    so the layer computes exactly what it did; a split (see ``rosa_scale.resample``) then moves
    ``r`` singular directions from the base into the factors.
    """

    def __init__(self, base: nn.Module, rank: int, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        out_features, in_features = linear_shape(base)
        self.base = base
        self.rank = rank
        self.out_features, self.in_features = out_features, in_features  # params may be partitioned later
        self.transposed = not isinstance(base, nn.Linear)
        self.fused = type(base) in LINEAR_TYPES  # see rosa_scale/fused_linear.py; False: separate operations
        self.backward_kernels = True  # the fused node's backward uses rosa_scale/thin_grads.py where it can
        self.forward_kernels = True  # and its forward rosa_scale/thin_forward.py
        self.compute_dtype = None  # factors kept whole beside a sharded base: cast to its compute dtype
        self.shared_input = None  # siblings called on the same input (rosa_scale/shared_input.py)
        self.shared_index = 0
        device = base.weight.device
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=adapter_dtype, device=device))
        self.down = nn.Parameter(torch.zeros(rank, in_features, dtype=adapter_dtype, device=device))
        base.weight.requires_grad_(False)

    @property
    def weight_param(self) -> nn.Parameter:
        """The frozen parameter holding ``w_fixed`` (stored transposed for Conv1D)."""
        return self.base.weight

    def fixed_weight(self) -> torch.Tensor:
        """``w_fixed`` as an (out x in) view of the local parameter."""
        w = self.base.weight
        return w.T if self.transposed else w

    @torch.no_grad()
    def resplit_(self, generator: torch.Generator, config) -> None:
        """Merge the factors into the weight, split again on a new window, copy in place.

        Values are copied into the existing parameters, never replacing them: optimizers hold them.
        """
        new = resplit_values(self.weight_param, self.up, self.down, transposed=self.transposed, rank=self.rank,
                             generator=generator, config=config)
        for param, value in zip((self.weight_param, self.up, self.down), new):
            param.copy_(value)

    def follow_resplit_(self) -> None:
        """What a DDP replica that does not own this matrix does at a resplit, before the owner's
        ``resplit_tensors()`` arrive by broadcast: nothing here (quantized layers fold their window)."""

    def resplit_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors a resplit writes, which the owner broadcasts to the other DDP replicas."""
        return self.weight_param.data, self.up.data, self.down.data

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``w_fixed + up @ down`` (out x in) in fp32."""
        return merge(self.fixed_weight(), self.up, self.down)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as the forward uses them: in ``compute_dtype`` where set."""
        if self.compute_dtype is None:
            return self.up, self.down
        return self.up.to(self.compute_dtype), self.down.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fused_dtype(self.base, x, self.compute_dtype or self.up.dtype) if self.fused else None
        if dtype is not None:  # the factors as they are: the node casts them and returns gradients in theirs
            out = self.shared_input.output(self, x, dtype) if self.shared_input is not None else None
            if out is not None:  # computed with its siblings, from one pass over the same input
                return out
            kernels = (self.forward_kernels, self.backward_kernels)
            return FusedRosaLinear.apply(x, self.base.weight, getattr(self.base, "bias", None), self.down,
                                         self.up, self.transposed, kernels, dtype)
        up, down = self.factors()
        out = self.base(x)
        delta = F.linear(F.linear(x.to(down.dtype), down), up)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, adapter_dtype={self.up.dtype}"


@torch.no_grad()
def resplit_values(w_param: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, transposed: bool, rank: int,
                   generator: torch.Generator, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New values of (weight param, up, down) from full tensors, in the storage layout and dtypes.

    The merge and split run in fp32; ``w_fixed`` is then rounded to the weight's dtype, stochastically
    if ``config.stochastic_rounding`` (bf16 only). Used by every engine on its full tensors.
    """
    w = merge(w_param.T if transposed else w_param, up, down)
    if config.factorize_device == "cpu":
        w = w.cpu()
    w_fixed, new_up, new_down = split(w, rank, method=config.method, sampling=config.sampling, generator=generator,
                                      overwrite=True)  # w is our own fresh merge
    w_fixed = round_to(w_fixed, w_param.dtype, stochastic=config.stochastic_rounding, generator=generator)
    w_fixed = w_fixed.T.contiguous() if transposed else w_fixed
    # back where the parameters live (a no-op unless factorized elsewhere), already in storage dtypes
    return w_fixed.to(w_param.device), new_up.to(up.device, up.dtype), new_down.to(down.device, down.dtype)
