"""Which way of keeping a quantized (bitsandbytes) base keeps what ROSA merges at each resample?

    python bench/quant_survival.py --out bench/results/quant-survival-DATE-cpu.json
    python bench/quant_survival.py --shape 128x128 --resamples 3 --out /tmp/smoke.json    # seconds
    python bench/quant_survival.py --weight smollm2:model.layers.10.mlp.up_proj.weight --out real.json

Why: a 4-bit base cannot absorb a small update by being re-quantized (a change much smaller
than the quantization step rounds back to the same code), so the design must be chosen from
numbers. One weight (random N(0, 0.02^2), or a real SmolLM2 matrix) is quantized as bitsandbytes
does for a frozen base:

    nf4, fp4   quantize_4bit / dequantize_4bit, block 64, double quantization (Linear4bit's default)
    int8       int8_vectorwise_quant of the fp16 weight, row-wise absmax (what Linear8bitLt stores)

and goes through ROSA resamples under three designs (and a bf16 variant of the first); the
effective weight ``W_eff`` is what the layer computes with:

    stack    (1) deq(Q0) + sum_k (up_k down_k - up0_k down0_k) + (up down - up0 down0):
                 the base is never re-quantized, each finished subspace is kept as frozen factors
                 (fp32; ``stack_bf16`` stores them in bf16, as differences so only D is rounded)
    master   (2) deq(Q) + (up down - up0 down0), Q re-quantized at each resample from an fp32
                 master copy (host RAM) that receives every merged change exactly
    inplace  (3) deq(Q) + (up down - up0 down0), Q <- quant(deq(Q) + up down - up0 down0)

``up0, down0`` are the factors at the split (``rosa_scale.factorize.split`` of ``W_eff``, on the
window of ``window_generator``) kept frozen beside the trained ``up, down``: the base cannot give
``up0 down0`` back by subtraction. A "trained update" D is a random change of ``up, down`` with
``|D| = s |W|``, so ``D = up down - up0 down0`` has rank <= 2r like a real phase's update.
Measured, per design, quantization and size s:

    survival      one phase then one resample: <W_after - W_start, D> / <D, D>
    rel_error     |W_after - W_start - D| / |D|
    out_change    |y_after - y_before| / |y_before| across the resample itself, y = x W_eff^T as
                  the layer computes it in fp32 (random x); out_change_vs_update divides by |x D^T|
    accum_*       K phases (a fresh D each), survival and error of sum D, mean out_change
    memory_*      bytes per matrix after K resamples: the quantized base, the stack (on the
                  device beside the base) or the fp32 master (host), and the trained factors
    quant_error   |deq(Q(W)) - W| / |W| (out_quant_error: the same for y), one quantization's worth

Weights are measured in float64 from the stored values, so the numbers are the storage's error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rosa_scale without an install

from rosa_scale.factorize import split, window_generator  # noqa: E402

QUANTS = ("nf4", "fp4", "int8")
DESIGNS = ("stack", "stack_bf16", "master", "inplace")
SIZES = (1e-3, 1e-2, 5e-2)
NAME = "layers.0.mlp.up_proj"  # the matrix name that seeds the windows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file (flat keys)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shape", default="2048x2048", help="OUTxIN of the random weight")
    p.add_argument("--weight", default="random",
                   help="'random' (N(0, 0.02^2)) or 'smollm2:<tensor name>' from the built-in SmolLM2-135M")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--resamples", type=int, default=20, help="K, phases of the accumulation part")
    p.add_argument("--sizes", default=",".join(f"{s:g}" for s in SIZES), help="relative update sizes |D|/|W|")
    p.add_argument("--quants", default=",".join(QUANTS))
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--method", choices=["svd", "eigh", "qr"], default="qr",
                   help="factorizer of the splits (the window only sets D's directions; qr costs milliseconds)")
    p.add_argument("--batch", type=int, default=32, help="rows of the random input x")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); 1 ran 4x faster than 2 on 2 shared cores")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def size_key(s: float) -> str:
    return f"{s:.0e}".replace("e-0", "e-")  # 1e-3, 5e-2


# --- bitsandbytes storage -------------------------------------------------------------------------

def quantize(w: torch.Tensor, quant: str):
    """The frozen base as bitsandbytes stores it: ("int8", CB, SCB) or (quant, packed, QuantState)."""
    import bitsandbytes.functional as F

    if quant == "int8":  # Int8Params._quantize: fp16 weight, row-wise absmax, no outlier columns
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return ("int8", cb, scb)
    packed, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, compress_statistics=True, quant_type=quant)
    return (quant, packed, state)


def dequantize(q) -> torch.Tensor:
    import bitsandbytes.functional as F

    if q[0] == "int8":
        return F.int8_vectorwise_dequant(q[1], q[2]).float()
    return F.dequantize_4bit(q[1], q[2]).float()


def quantized_bytes(q) -> int:
    """Bytes of the packed codes and every statistic (the shared 16-entry 4-bit code counted too)."""
    if q[0] == "int8":
        return q[1].nbytes + q[2].nbytes
    state = q[2]
    parts = [q[1], state.absmax, state.code]
    if state.nested:
        parts += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.nbytes for t in parts)


# --- one matrix under one design ------------------------------------------------------------------

@dataclass
class Layer:
    """One adapted matrix: quantized base, trained factors, their frozen split values, and the
    design's extra storage (the stack of finished subspaces, or the fp32 master)."""
    design: str
    quant: str
    base: tuple
    up: torch.Tensor = None
    down: torch.Tensor = None
    up0: torch.Tensor = None
    down0: torch.Tensor = None
    stack_up: list = field(default_factory=list)    # design stack: [up_k, up_k - up0_k]     (out x 2r)
    stack_down: list = field(default_factory=list)  #               [down_k - down0_k; down0_k] (2r x in)
    master: torch.Tensor | None = None              # design master: fp32, host RAM in a real run
    stack_sum: torch.Tensor | None = None           # bench only: fp32 sum of the stack, for the splits
    base_values: torch.Tensor = None                # deq(base), fp32: what the layer computes with

    def __post_init__(self):
        self.set_base(self.base)

    def set_base(self, base) -> None:
        """Store a new quantized base and its dequantized values (a layer would dequantize them on
        the fly, to the same values)."""
        self.base, self.base_values = base, dequantize(base)

    def weight64(self) -> torch.Tensor:
        """W_eff exactly (float64) from the stored values."""
        w = self.base_values.double()
        if self.stack_up:
            w += torch.cat(self.stack_up, dim=1).double() @ torch.cat(self.stack_down).double()
        up, down, up0, down0 = (t.double() for t in (self.up, self.down, self.up0, self.down0))
        return w + torch.cat([up - up0, up], dim=1) @ torch.cat([down0, down - down0])

    def weight32(self) -> torch.Tensor:
        """W_eff in fp32, what a resample splits (between merge and split there are no factors).

        The stack enters as a running fp32 sum: the same values up to rounding, without the
        2 m n (2 r K) flops of recomputing it (the split only needs the window's directions)."""
        w = self.base_values.clone() if self.stack_sum is None else self.base_values + self.stack_sum
        if self.up is None:
            return w
        return w.addmm_(self.up, self.down).addmm_(self.up0, self.down0, alpha=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W_eff^T as the layer computes it in fp32: base, then each low-rank term."""
        y = x @ self.base_values.T
        if self.stack_up:
            y += (x @ torch.cat(self.stack_down).float().T) @ torch.cat(self.stack_up, dim=1).float().T
        return y + (x @ self.down.T) @ self.up.T - (x @ self.down0.T) @ self.up0.T

    def memory(self) -> dict:
        """Bytes on the device (base, stack, factors) and on the host (master)."""
        stack = sum(t.nbytes for t in self.stack_up + self.stack_down)
        factors = sum(t.nbytes for t in (self.up, self.down, self.up0, self.down0))
        base = quantized_bytes(self.base)
        host = self.master.nbytes if self.master is not None else 0
        return {"base": base, "stack": stack, "master": host, "factors": factors,
                "device": base + stack + factors, "host": host, "total": base + stack + factors + host}


def new_split(layer: Layer, index: int, rank: int, method: str, seed: int) -> None:
    """A real ROSA split of W_eff on the window for (seed, index, NAME): up0 = up, down0 = down."""
    _, up, down = split(layer.weight32(), rank, method=method, generator=window_generator(seed, index, NAME))
    layer.up0, layer.down0 = up, down
    layer.up, layer.down = up.clone(), down.clone()


def start(w0: torch.Tensor, design: str, quant: str, rank: int, method: str, seed: int) -> Layer:
    """What applying ROSA to a quantized model does: quantize the weight, split index 0."""
    layer = Layer(design, quant, quantize(w0, quant), master=w0.clone() if design == "master" else None)
    new_split(layer, 0, rank, method, seed)
    return layer


def resample(layer: Layer, index: int, rank: int, method: str, seed: int) -> None:
    """Merge the trained change ``up down - up0 down0`` the design's way, then split anew."""
    if layer.design.startswith("stack"):  # kept as frozen factors, nothing re-quantized
        # up (down - down0) + (up - up0) down0: stored as differences, a bf16 stack rounds only
        # relative to the update (up down and up0 down0 rounded apart would lose it).
        dtype = torch.bfloat16 if layer.design == "stack_bf16" else torch.float32
        layer.stack_up.append(torch.cat([layer.up, layer.up - layer.up0], dim=1).to(dtype))
        layer.stack_down.append(torch.cat([layer.down - layer.down0, layer.down0]).to(dtype))
        if layer.stack_sum is None:
            layer.stack_sum = torch.zeros_like(layer.base_values)
        layer.stack_sum.addmm_(layer.stack_up[-1].float(), layer.stack_down[-1].float())
    else:
        change = torch.addmm(layer.up @ layer.down, layer.up0, layer.down0, alpha=-1)
        if layer.design == "master":
            layer.master += change
            layer.set_base(quantize(layer.master, layer.quant))
        else:  # inplace
            layer.set_base(quantize(layer.base_values + change, layer.quant))
    layer.up = layer.down = layer.up0 = layer.down0 = None
    new_split(layer, index, rank, method, seed)


def train(layer: Layer, rel_size: float, w_norm: float, gen: torch.Generator) -> torch.Tensor:
    """A random change of the trained factors whose first-order part ``gu down0 + up0 gd`` has norm
    ``rel_size * w_norm``; returns the update it makes, ``up down - up0 down0``, exactly (float64)."""
    dev = layer.up.device
    gu = torch.randn(layer.up.shape, generator=gen).to(dev, torch.float64)
    gd = torch.randn(layer.down.shape, generator=gen).to(dev, torch.float64)
    u0, d0 = layer.up0.double(), layer.down0.double()
    # |gu d0 + u0 gd|^2 from r x r products: <A B, C D> = tr((A^T C)(D B^T)).
    sq = (torch.trace((gu.T @ gu) @ (d0 @ d0.T)) + torch.trace((u0.T @ u0) @ (gd @ gd.T))
          + 2 * torch.trace((gu.T @ u0) @ (gd @ d0.T)))
    scale = rel_size * w_norm / float(sq.sqrt())
    layer.up = layer.up0 + (scale * gu).float()
    layer.down = layer.down0 + (scale * gd).float()
    up, down = layer.up.double(), layer.down.double()
    # (up - up0) down0 + up (down - down0); differences of fp32 values are exact in float64.
    return torch.cat([up - u0, up], dim=1) @ torch.cat([d0, down - d0])


# --- the measurements ------------------------------------------------------------------------------

def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.norm() / b.norm())


def measure(w0: torch.Tensor, design: str, quant: str, sizes, args, x: torch.Tensor, out: dict) -> None:
    """K phases per size, each a fresh random update D then a resample; the first phase gives the
    one-resample numbers, the last the accumulated ones and the memory."""
    rank, method, seed = args.rank, args.method, args.seed
    w_norm = float(w0.double().norm())
    gen = torch.Generator().manual_seed(seed + 1)  # the same updates for every design and quantization
    for s in sizes:
        key = f"{design}_{quant}_{size_key(s)}"
        layer = start(w0, design, quant, rank, method, seed)
        w_start = layer.weight64()
        total = torch.zeros_like(w_start)
        jumps = []
        for k in range(1, args.resamples + 1):
            delta = train(layer, s, w_norm, gen)
            total += delta
            y_before = layer.forward(x).double()
            resample(layer, k, rank, method, seed)
            jump = float((layer.forward(x).double() - y_before).norm())
            jumps.append(jump / float(y_before.norm()))
            if k == 1:
                eff = layer.weight64() - w_start
                out[f"survival_{key}"] = inner(eff, delta) / inner(delta, delta)
                out[f"rel_error_{key}"] = rel(eff - delta, delta)
                out[f"out_change_{key}"] = jumps[0]
                out[f"out_change_vs_update_{key}"] = jump / float((x.double() @ delta.T).norm())
                out[f"delta_rel_size_{size_key(s)}"] = float(delta.norm()) / w_norm
        eff = layer.weight64() - w_start
        out[f"accum_survival_{key}"] = inner(eff, total) / inner(total, total)
        out[f"accum_error_{key}"] = rel(eff - total, total)
        out[f"accum_out_change_mean_{key}"] = sum(jumps) / len(jumps)
        out[f"accum_sum_rel_size_{size_key(s)}"] = float(total.norm()) / w_norm
    for part, value in layer.memory().items():  # after K resamples (the same for every size)
        out[f"memory_{part}_bytes_{design}_{quant}"] = value
    if design.startswith("stack"):
        per_resample = out[f"memory_stack_bytes_{design}_{quant}"] / args.resamples
        out[f"memory_stack_bytes_per_resample_{design}"] = per_resample
        out[f"stack_resamples_to_bf16_weight_{design}"] = out["memory_bf16_weight_bytes"] / per_resample


def load_weight(args) -> torch.Tensor:
    if args.weight == "random":
        rows, cols = (int(v) for v in args.shape.lower().split("x"))
        return 0.02 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(args.seed))
    if not args.weight.startswith("smollm2:"):
        raise SystemExit(f"quant_survival: --weight must be 'random' or 'smollm2:<tensor name>', got {args.weight!r}")
    from safetensors import safe_open

    from rosa_scale.builtin.smollm2 import smollm2_dir

    with safe_open(str(smollm2_dir() / "model.safetensors"), "pt") as f:
        return f.get_tensor(args.weight.split(":", 1)[1]).float()


def table(out: dict, sizes, quants, designs) -> str:
    """Two small text tables: one resample, and K resamples."""
    sk = [size_key(s) for s in sizes]
    mid = size_key(1e-2) if 1e-2 in sizes else sk[len(sk) // 2]
    lines = [f"one resample: survival at s = {' / '.join(sk)}; output change at the resample (s={mid}); "
             f"memory after K={out['resamples']} (device + host MB)",
             f"{'quant':6} {'design':10} {'survival':>26} {'out_change':>11} {'vs |xD|':>8} {'memory MB':>16}"]
    for q in quants:
        for d in designs:
            surv = " / ".join(f"{out[f'survival_{d}_{q}_{k}']:.3f}" for k in sk)
            dev, host = out[f"memory_device_bytes_{d}_{q}"] / 2**20, out[f"memory_host_bytes_{d}_{q}"] / 2**20
            lines.append(f"{q:6} {d:10} {surv:>26} {out[f'out_change_{d}_{q}_{mid}']:11.2e} "
                         f"{out[f'out_change_vs_update_{d}_{q}_{mid}']:8.2f} {dev:7.2f} + {host:6.2f}")
    lines += ["", f"K={out['resamples']} resamples: survival of sum D / |error| / |sum D| at s = {' / '.join(sk)}",
              f"{'quant':6} {'design':10} {'survival':>26} {'error':>32}"]
    for q in quants:
        for d in designs:
            surv = " / ".join(f"{out[f'accum_survival_{d}_{q}_{k}']:.3f}" for k in sk)
            err = " / ".join(f"{out[f'accum_error_{d}_{q}_{k}']:.2e}" for k in sk)
            lines.append(f"{q:6} {d:10} {surv:>26} {err:>32}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # a caller (a test) keeps its own setting


def run(args) -> dict:
    import bitsandbytes

    t_start = time.time()
    sizes = [float(s) for s in args.sizes.split(",")]
    quants, designs = args.quants.split(","), args.designs.split(",")
    for name, given, known in (("quant", quants, QUANTS), ("design", designs, DESIGNS)):
        if set(given) - set(known):
            raise SystemExit(f"quant_survival: unknown {name} {sorted(set(given) - set(known))}; choose from {known}")
    w0 = load_weight(args).to(args.device)
    x = torch.randn(args.batch, w0.shape[1], generator=torch.Generator().manual_seed(args.seed + 2)).to(args.device)
    out = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "bitsandbytes": bitsandbytes.__version__, "device": args.device, "machine": platform.machine(), "threads": torch.get_num_threads(),
           "weight": args.weight, "shape": list(w0.shape), "weight_std": float(w0.std()), "rank": args.rank,
           "resamples": args.resamples, "sizes": sizes, "method": args.method, "seed": args.seed,
           "quants": quants, "designs": designs, "blocksize_4bit": 64, "double_quant_4bit": True,
           "memory_fp32_weight_bytes": w0.numel() * 4, "memory_bf16_weight_bytes": w0.numel() * 2}
    for q in quants:
        deq = dequantize(quantize(w0, q))  # one quantization's worth, of the weight and of the output
        out[f"quant_error_{q}"] = rel(deq - w0, w0)
        out[f"out_quant_error_{q}"] = rel(x.double() @ (deq - w0).double().T, x.double() @ w0.double().T)
        for d in designs:
            measure(w0, d, q, sizes, args, x, out)
            print(f"[{time.time() - t_start:6.1f}s] {q} {d} done", flush=True)
        if "inplace" in designs and 1e-2 in sizes:
            out[f"survival_{q}"] = out[f"survival_inplace_{q}_1e-2"]  # the headline: in-place, s = 1e-2
    out["seconds"] = round(time.time() - t_start, 1)
    print(table(out, sizes, quants, designs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
