"""ROSA over a frozen 4-bit or 8-bit base (bitsandbytes): the base is quantized once, never rewritten.

A quantized base cannot take a resample's merge: one dequantize -> add -> re-quantize cycle with
NF4 (block 64) keeps about 1.5% of a merged update of relative size 1e-2, so most of what a
window learned would be rounded away. ``QuantRosaLinear`` keeps instead::

    W_eff = deq(Q0) + S + (up - up0) @ down + up0 @ (down - down0)

- ``Q0``: the original weight, quantized once (``Linear4bit`` nf4/fp4 with double quantization,
  computing in the model's dtype, or ``Linear8bitLt`` int8), frozen;
- ``up0, down0``: frozen copies of the factors at the window's split, so the last two terms are
  ``up @ down - up0 @ down0``, the current window's change, exactly 0 right after a split;
- ``S = stack_up @ stack_down``: every finished window's change, appended at each resample as
  columns ``[up - up0, up0]`` of ``stack_up`` (out x c) and rows ``[down; down - down0]`` of
  ``stack_down`` (c x in). Each product has one update-sized factor (a difference), so storing the
  stack in bf16 rounds the update by ~2^-9 of itself, never by a fraction of the weight.

A resample folds the window into ``S``, splits ``deq(Q0) + S`` (fp32) on the new window with
``rosa_scale.factorize.split`` and copies the new factors into ``up``/``down`` and ``up0``/``down0``:
nothing is re-quantized, so the model's function changes only by the stack's rounding of the
folded update. The stack grows by ``2 r (out + in)`` elements per resample (for 4096 x 4096 at
r=16: 512 KiB in bf16, 6% of the NF4 base's 8 MiB), and its matmuls by as many flops per token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .factorize import split
from .layer import RosaLinear

QUANT_TYPES = ("nf4", "fp4", "int8")
_STACK_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Frozen tensors DDP must not broadcast at every forward: the resample keeps them identical itself.
_DDP_IGNORED = ("up0", "down0", "stack_up", "stack_down", "frozen_peak", "windows")
# What a QuantRosaLinear adds to the frozen base in a state dict: all a resume needs beside the
# original weights (the base is quantized again from them, deterministically).
ROSA_TENSORS = ("up", "down") + _DDP_IGNORED


def bitsandbytes():
    """The bitsandbytes module, or one line saying how to get it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("config key 'rosa.quantize' needs bitsandbytes: pip install 'rosa-scale[bnb]'") from None
    return bnb


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes linear layer (Linear4bit, Linear8bitLt, ...), without importing bitsandbytes."""
    return type(module).__module__.split(".")[0] == "bitsandbytes"


def quantize_linear(layer: nn.Linear, quant_type: str) -> nn.Module:
    """A frozen bitsandbytes copy of ``layer`` on its device: ``Linear4bit`` (nf4/fp4, double
    quantization, computing in the layer's dtype: bf16 for a bf16 model) or ``Linear8bitLt`` (int8,
    no fp16 weights kept; input columns above 6.0 multiplied in fp16, LLM.int8's and transformers'
    default: on CPU it cut the int8 matmul's error 4x for an input with one outlier column); the
    bias is kept as it is."""
    if type(layer) is not nn.Linear:
        raise ConfigError(f"rosa.quantize works on nn.Linear layers, not {type(layer).__name__}")
    bnb = bitsandbytes()
    weight, bias, device = layer.weight.detach(), layer.bias, layer.weight.device
    if quant_type in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None,
                              compute_dtype=weight.dtype, compress_statistics=True, quant_type=quant_type,
                              device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type=quant_type,
                                     module=q)
    elif quant_type == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")  # transformers' default
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ConfigError(f"config key 'rosa.quantize' must be one of {', '.join(QUANT_TYPES)} or 'none', got {quant_type!r}")
    if bias is not None:
        q.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes when its parameter is moved to a device


def keep_standard_layout(base: nn.Module) -> None:
    """Keep a ``Linear4bit`` in the layout ``dequantize_4bit`` reads. On CPUs with AVX512-BF16 its
    forward in eval mode without gradients repacks the weight in place into a CPU-only layout (and fails
    for in_features that are not a multiple of its block size): turn that off, and undo it where it
    already happened (a model run in eval mode before ``apply_rosa``)."""
    if hasattr(base, "support_avx512bf16_for_cpu"):
        base.support_avx512bf16_for_cpu = False
    w = base.weight
    if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)


def _expose_saved_names(base: nn.Module) -> None:
    """``Linear8bitLt`` saves ``SCB`` and ``weight_format`` entries that are no attributes of it, and
    ``torch.distributed.checkpoint``'s state-dict functions look every saved name up on the module:
    give them attributes to find (unused by bitsandbytes, which reads its scales from weight or state)."""
    if type(base).__name__ == "Linear8bitLt":
        for name in ("SCB", "weight_format"):
            if not hasattr(base, name):
                object.__setattr__(base, name, None)


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values`` (flat, fp32) times the absmax of their block of ``blocksize`` consecutive elements."""
    n = values.numel()
    padded = F.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    return (padded * scales.float().view(-1, 1)).reshape(-1)[:n]


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` (in ``state.dtype``), computed in plain torch on the CPU.

    bitsandbytes 0.50's CPU kernel assumes that no block of 64 codes crosses a row: for a weight
    whose in_features is not a multiple of the block size (a 96-wide layer) it returns other values
    than its CUDA kernel, which reads the codes as one flat run of blocks, as they were quantized.
    Here the codes are read that way on any device: code[nibble] * absmax in fp32 (absmax itself
    from its 8-bit double quantization plus offset), then cast, the CUDA kernel's arithmetic."""
    if packed.is_cuda:
        return bitsandbytes().functional.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        inner = state.state2
        absmax = _blockwise(inner.code.float()[absmax.long()], inner.absmax, inner.blocksize) + state.offset
    codes = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).long()
    count = torch.Size(state.shape).numel()
    values = _blockwise(state.code.float().to(packed.device)[nibbles[:count]], absmax, state.blocksize)
    return values.to(state.dtype).reshape(state.shape)


@torch.no_grad()
def dequantize(base: nn.Module) -> torch.Tensor:
    """The (out x in) weight a bitsandbytes layer holds, in fp32."""
    w = base.weight
    if hasattr(w, "quant_state"):  # Params4bit
        keep_standard_layout(base)
        return dequantize_4bit(w.data, w.quant_state).float()
    scale = getattr(w, "SCB", None)
    if scale is None:  # Linear8bitLt moves the scales to its state at the first forward
        scale = getattr(getattr(base, "state", None), "SCB", None)
    if scale is not None:  # Int8Params: int8 rows with absmax scaling
        return w.data.float() * (scale.float()[:, None] / 127.0)
    raise TypeError(f"{type(base).__name__} holds no quantized weight to dequantize")


_SAVED_DTYPES = ("float32", "bfloat16", "float16")


@torch.no_grad()
def dequantize_saved(saved: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (out x in) fp32 weight of a bitsandbytes layer's saved state (its ``state_dict`` entries
    without the layer's prefix: ``weight`` and ``weight.absmax``, ... for 4-bit; ``weight`` and ``SCB``
    for int8), as ``dequantize`` gives it from the live layer. The 4-bit record's JSON part is read
    as data and checked before bitsandbytes sees it."""
    weight = saved["weight"]
    if "SCB" in saved:
        return weight.float() * (saved["SCB"].float()[:, None] / 127.0)
    bf = bitsandbytes().functional
    parts = {k[len("weight."):]: v for k, v in saved.items() if k.startswith("weight.")}
    packed = [k for k in parts if k.startswith("quant_state.")]
    if len(packed) != 1:
        raise ValueError(f"a 4-bit weight's state needs one quant_state entry, found {len(packed)}")
    parts.update(bf.unpack_tensor_to_dict(parts.pop(packed[0])))  # JSON
    for key in ("dtype", "nested_dtype"):
        if key in parts and parts[key] not in _SAVED_DTYPES:
            raise ValueError(f"a 4-bit weight's state names dtype {parts[key]!r}")
    if parts.get("quant_type") not in ("nf4", "fp4"):
        raise ValueError(f"a 4-bit weight's state names quant_type {parts.get('quant_type')!r}")
    state = bf.QuantState.from_dict(parts, device=weight.device)
    return dequantize_4bit(weight, state).float()


@torch.no_grad()
def merged_from_parts(base: torch.Tensor, up, down, up0, down0, stack_up, stack_down) -> torch.Tensor:
    """``deq(Q0) + S + (up - up0) @ down + up0 @ (down - down0)`` in fp32, ``base`` being ``deq(Q0)``
    (fp32, updated in place): the effective weight, live (``merged_weight``) or from a checkpoint."""
    if stack_up.shape[1]:
        base.addmm_(stack_up.float(), stack_down.float())
    up, down, up0, down0 = (t.float() for t in (up, down, up0, down0))
    base.addmm_(up - up0, down)
    base.addmm_(up0, down - down0)
    return base


@torch.no_grad()
def fingerprint(base: nn.Module, chunk: int = 1 << 24) -> list[int]:
    """Two exact checksums over the bytes of everything ``base`` saves (codes, scales, quantization
    state): their sum and their position-weighted sum, computed on the base's device in chunks. A
    resume compares them to tell that it quantized the same base again, without reading the
    checkpoint's copy of it. Integer arithmetic in float64 stays exact below 2^53: a byte (< 256)
    times a weight (< 65536) over < 2^29 bytes per chunk."""
    plain, weighted = 0, 0
    for value in base.state_dict().values():
        data = value.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, data.numel(), chunk):
            part = data[start:start + chunk].double()
            weight = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.float64) % 65521 + 1
            plain += int(part.sum().item())
            weighted += int((part * weight).sum().item())
    return [plain, weighted]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A factor whole: gathered from its FSDP2 shards (a collective), or as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def parameter_count(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a packed 4-bit one holds two per byte, a ZeRO-3 one looks empty."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def quant_type_of(base: nn.Module) -> str:
    w = base.weight
    return getattr(w, "quant_type", None) or "int8"


class QuantRosaLinear(RosaLinear):
    """``base(x) + S(x) + (up - up0)(down(x)) + up0((down - down0)(x))`` over a frozen quantized ``base``.

    ``up``/``down`` are the trained Parameters (never replaced); ``up0``, ``down0``, ``stack_up``,
    ``stack_down`` are buffers (frozen; the stack's are replaced by longer ones at a resample).
    ``merge_dtype`` is the dtype of the plain weight ``merge_rosa`` gives back.
    """

    def __init__(self, base: nn.Module, rank: int, adapter_dtype: torch.dtype = torch.float32,
                 stack_dtype: torch.dtype = torch.bfloat16, merge_dtype: torch.dtype = torch.bfloat16):
        if not is_quantized_linear(base):
            raise TypeError(f"QuantRosaLinear needs a bitsandbytes layer, got {type(base).__name__}")
        keep_standard_layout(base)
        _expose_saved_names(base)
        super().__init__(base, rank, adapter_dtype)
        self.merge_dtype = merge_dtype
        device, out_features, in_features = self.up.device, self.out_features, self.in_features
        # splits made so far (the first has no trained window to fold); a buffer, so it is saved with the stack
        self.register_buffer("windows", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("up0", torch.zeros_like(self.up))
        self.register_buffer("down0", torch.zeros_like(self.down))
        self.register_buffer("stack_up", torch.zeros(out_features, 0, dtype=stack_dtype, device=device))
        self.register_buffer("stack_down", torch.zeros(0, in_features, dtype=stack_dtype, device=device))
        peak = dequantize(base).abs().amax().reshape(1)
        self.register_buffer("frozen_peak", peak)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The stack of a saved layer may hold more windows than this one: take its size first."""
        for name in ("stack_up", "stack_down"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight_param(self) -> torch.Tensor:
        """A bound of ``max |deq(Q0) + S|`` (1 element, fp32), in place of ``w_fixed`` for the guard.

        The quantized base is never written, so it cannot turn non-finite; what can is the stack,
        whose growth this bound follows (inf if anything folded was not finite). With it the guard's
        test ``peak + r max|up| max|down|`` bounds the effective weight the next split will form.
        """
        return self.frozen_peak

    def fixed_weight(self) -> torch.Tensor:
        raise TypeError("a quantized ROSA layer has no w_fixed; merged_weight() gives its effective weight")

    @torch.no_grad()
    def frozen_weight(self) -> torch.Tensor:
        """``deq(Q0) + S`` (out x in) in fp32: the effective weight right after a split."""
        w = dequantize(self.base)
        if self.stack_up.shape[1]:
            w.addmm_(self.stack_up.float(), self.stack_down.float())
        return w

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``deq(Q0) + S + up @ down - up0 @ down0`` (out x in) in fp32. Under FSDP2 every process
        must call it together (the factors' shards are gathered)."""
        return merged_from_parts(dequantize(self.base), _whole(self.up), _whole(self.down), self.up0, self.down0,
                                 self.stack_up, self.stack_down)

    def _window_factors(self, up=None, down=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out x 2r, 2r x in) whose product is the current window's change ``up down - up0 down0``.
        The frozen copies take the factors' dtype: under FSDP2's bf16 compute both round alike, so the
        change is exactly 0 right after a split there too."""
        up = self.up if up is None else up
        down = self.down if down is None else down
        up0, down0 = self.up0.to(up.dtype), self.down0.to(down.dtype)
        return torch.cat([up - up0, up0], dim=1), torch.cat([down, down - down0])

    @torch.no_grad()
    def fold_window_(self, up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> None:
        """Append the current window's change to the stack (no-op before the first split); ``up`` and
        ``down`` are the whole factors where the layer holds shards of them (FSDP2).

        Element-wise work on the factors only, so replicas whose factors are identical (DDP, or FSDP2
        after gathering) fold bit-identically without communicating.
        """
        if int(self.windows) == 0:
            return
        new_up, new_down = self._window_factors(up, down)
        bound = (new_up.abs().amax(dim=0) * new_down.abs().amax(dim=1)).sum().float()
        self.frozen_peak.add_(torch.nan_to_num(bound, nan=float("inf")))
        self.stack_up = torch.cat([self.stack_up, new_up.to(self.stack_up.dtype)], dim=1)
        self.stack_down = torch.cat([self.stack_down, new_down.to(self.stack_down.dtype)])

    @torch.no_grad()
    def split_frozen(self, generator: torch.Generator, config) -> tuple[torch.Tensor, torch.Tensor]:
        """The new window's factors of ``deq(Q0) + S``, in the factors' dtype (call after folding)."""
        w = self.frozen_weight()
        if config.factorize_device == "cpu":
            w = w.cpu()
        _, up, down = split(w, self.rank, method=config.method, sampling=config.sampling, generator=generator,
                            overwrite=True)  # w_fixed is not needed: the base stays as it is
        device = self.up0.device
        return up.to(device, self.up0.dtype), down.to(device, self.down0.dtype)

    @torch.no_grad()
    def correct_error_(self, original: torch.Tensor, rank: int) -> None:
        """Start the (empty) stack with the best rank-``rank`` fit of ``original - deq(Q0)``: the part
        of the quantization error a low-rank term can hold (LoftQ's first step; the base is kept)."""
        if self.stack_up.shape[1]:
            raise RuntimeError("the quantization error is corrected before the first window is folded")
        error = original.to(self.stack_up.device, torch.float32) - dequantize(self.base)
        rank = min(rank, min(error.shape) - 1)  # split keeps a rank below the smaller side
        _, up, down = split(error, rank, method="eigh", sampling="top", overwrite=True)
        self.frozen_peak.add_((up.abs().amax(dim=0) * down.abs().amax(dim=1)).sum())
        self.stack_up = up.to(self.stack_up.dtype)
        self.stack_down = down.to(self.stack_down.dtype)

    @torch.no_grad()
    def start_window_(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """The new window starts at ``up0, down0 = up, down`` (the trained factors are written by the caller)."""
        self.up0.copy_(up)
        self.down0.copy_(down)
        self.windows += 1

    @torch.no_grad()
    def resplit_(self, generator: torch.Generator, config) -> None:
        """Fold the window into the stack, split ``deq(Q0) + S`` on a new window, copy in place."""
        self.fold_window_()
        up, down = self.split_frozen(generator, config)
        self.up.copy_(up)
        self.down.copy_(down)
        self.start_window_(self.up, self.down)

    def follow_resplit_(self) -> None:
        """A replica that does not own this matrix: fold like the owner; the factors come by broadcast."""
        self.fold_window_()
        self.windows += 1

    def resplit_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.up.data, self.down.data, self.up0, self.down0

    @torch.no_grad()
    def to_plain(self) -> nn.Linear:
        """A plain ``nn.Linear`` in ``merge_dtype`` holding the dequantized, merged weight and the bias."""
        bias = self.base.bias
        plain = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=self.up.device,
                          dtype=self.merge_dtype)
        plain.weight.copy_(self.merged_weight())
        if bias is not None:
            plain.bias.copy_(bias)
        return plain

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base's output: bitsandbytes' own layer, except a 4-bit base on the CPU, whose
        kernel misreads some shapes (``dequantize_4bit``): there the weight is dequantized here and
        multiplied as ``Linear4bit`` does (in its compute dtype, back to the input's dtype)."""
        state = getattr(self.base.weight, "quant_state", None)
        if state is None or x.is_cuda:
            return self.base(x)
        dtype = self.base.compute_dtype or x.dtype
        bias = self.base.bias
        weight = dequantize_4bit(self.base.weight.data, state).to(dtype)
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self.stack_up.shape[1]:
            xs = x.to(self.stack_up.dtype)
            out = out + F.linear(F.linear(xs, self.stack_down), self.stack_up).to(out.dtype)
        up, down = self._window_factors(*self.factors())
        delta = F.linear(F.linear(x.to(down.dtype), down), up)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, quantize={quant_type_of(self.base)}, adapter_dtype={self.up.dtype}, "
                f"stack={tuple(self.stack_up.shape)}/{self.stack_up.dtype}")


def check_target(name: str, layer: nn.Module, config) -> None:
    """Refuse, before anything is wrapped, a target that ``config.quantize`` cannot make a frozen base of:
    not an nn.Linear, a bitsandbytes layer without a quantized weight, or one quantized otherwise."""
    if is_quantized_linear(layer):
        if not hasattr(layer.weight, "quant_state") and getattr(layer.weight, "SCB", None) is None \
                and getattr(getattr(layer, "state", None), "SCB", None) is None:
            raise ConfigError(f"target module {name!r} is a {type(layer).__name__} without a quantized 4-bit or "
                              "int8 weight: ROSA needs a frozen quantized base")
        kind = quant_type_of(layer)
        if config.quantize not in ("none", kind):
            raise ConfigError(f"config key 'rosa.quantize' is {config.quantize!r} but target module {name!r} is "
                              f"already quantized as {kind}: use quantize 'none' or {kind!r}")
    elif config.quantize != "none" and type(layer) is not nn.Linear:
        raise ConfigError(f"config key 'rosa.quantize' works on nn.Linear layers; target module {name!r} is a "
                          f"{type(layer).__name__}")


def wrap_quantized(layer: nn.Module, rank: int, config, adapter_dtype: torch.dtype, model_dtype: torch.dtype,
                   original: torch.Tensor | None = None) -> QuantRosaLinear:
    """Quantize ``layer`` (an nn.Linear) as ``config.quantize`` says and wrap it; a layer that is
    already quantized (a model loaded with transformers' ``BitsAndBytesConfig``) is wrapped as it is
    (``check_target`` has checked that ``config.quantize`` is 'none' or names its quantization);
    ``original`` is its weight before quantization, which ``config.quant_error_rank`` needs then."""
    stack_dtype = _STACK_DTYPES[config.stack_dtype]
    if is_quantized_linear(layer):
        if config.quant_error_rank and original is None:
            raise ConfigError("config key 'rosa.quant_error_rank' needs the original weights of a model loaded "
                              "quantized: pass them to apply_rosa (originals=...), or quantize in apply_rosa")
        state = getattr(layer.weight, "quant_state", None)  # merged back to the dtype it was quantized from
        merge_dtype = state.dtype if state is not None and state.dtype.is_floating_point else model_dtype
        wrapped = QuantRosaLinear(layer, rank, adapter_dtype, stack_dtype=stack_dtype, merge_dtype=merge_dtype)
    else:
        original = layer.weight.detach()
        wrapped = QuantRosaLinear(quantize_linear(layer, config.quantize), rank, adapter_dtype,
                                  stack_dtype=stack_dtype, merge_dtype=layer.weight.dtype)
    if config.quant_error_rank:
        wrapped.correct_error_(original, config.quant_error_rank)
    return wrapped


def drop_quantization_config(config) -> None:
    """A model config that describes plain weights again (merged, dequantized): without transformers'
    ``quantization_config``, which would make ``from_pretrained`` expect quantized tensors."""
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config


def forget_quantization(model: nn.Module) -> None:
    """After merging, a model loaded with ``BitsAndBytesConfig`` whose quantized layers are all gone
    must not be saved as a quantized one: drop transformers' record of the quantization."""
    if any(is_quantized_linear(m) for m in model.modules()):
        return
    drop_quantization_config(getattr(model, "config", None))
    for attr, plain in (("is_quantized", False), ("hf_quantizer", None), ("quantization_method", None),
                        ("is_loaded_in_4bit", False), ("is_loaded_in_8bit", False)):
        if hasattr(model, attr):
            setattr(model, attr, plain)


def _frozen_buffer_names(model: nn.Module) -> set[str]:
    return {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantRosaLinear) for b in _DDP_IGNORED}


def ignore_in_ddp(model: nn.Module, *, undo: bool = False) -> None:
    """Keep DDP from broadcasting the frozen ROSA buffers from rank 0 at every forward (the stack
    grows with each resample); the resample itself keeps them identical on every rank.
    ``undo=True`` takes the names out again (before the layers are merged away)."""
    names = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    names = names - _frozen_buffer_names(model) if undo else names | _frozen_buffer_names(model)
    model._ddp_params_and_buffers_to_ignore = sorted(names)


def refuse_quantized(layers, engine: str) -> None:
    """One line for engines that cannot hold a quantized base (DeepSpeed ZeRO-3)."""
    quantized = [n for n, layer in layers.items() if isinstance(layer, QuantRosaLinear)]
    if quantized:
        raise ConfigError(f"config key 'rosa.quantize' ({quant_type_of(layers[quantized[0]].base)}) is not "
                          f"supported under {engine}: train a quantized base in one process, under DDP or FSDP2")


def quantized_base_params(model: nn.Module) -> set[nn.Parameter]:
    """The frozen quantized bases' parameters (codes, bias): FSDP2 leaves them whole on every process."""
    return {p for m in model.modules() if isinstance(m, QuantRosaLinear) for p in m.base.parameters()}
