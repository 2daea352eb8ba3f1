"""Does a merged ROSA update survive the rounding of ``w_fixed`` to bf16 at a resample?

    python bench/bf16_merge_survival.py --out bench/results/bf16-merge-survival-DATE.json
    python bench/bf16_merge_survival.py --size 512 --out /tmp/smoke.json          # quick check

One synthetic weight (``--size`` square, std 0.02 like a Llama projection, cast to bf16 as a
model would hold it) goes through ``rosa_scale.layer.resplit_values`` (the per-layer resample
every engine runs) with three storages of ``w_fixed``:

    bf16_nearest     bf16, round-to-nearest (the default)
    bf16_stochastic  bf16, RosaConfig(stochastic_rounding=True)
    fp32             RosaConfig(fixed_dtype="float32")

The layer's weight is always measured as ``w_fixed + up @ down`` in float64, so the numbers are
the storage's error, not the measurement's. A "trained update" is a random change of the factors,
``Delta = (up + du) (down + dd) - up down``, scaled to the asked ``|Delta| / |W|``. Parts:

    survival      one update, one resample: survival = <dW_eff, Delta>/|Delta|^2 and
                  rel_error = |dW_eff - Delta| / |Delta|, with dW_eff = W_after - W_before.
    drift         K resamples, no training: |W_K - W_0| / |W_0| (the noise a resample adds).
    accumulation  P phases of (update of size 1e-3, resample): |W_P - (W_0 + sum Delta)| / |sum Delta|
                  and the survival of sum Delta, also after the final export to bf16 (round-to-nearest,
                  as merge_rosa writes a bf16 model).

``--check-size`` repeats the survival part with the exact SVD factorizer: on the same kind of weight
with a random window (does the factorizer matter?), and with ``sampling="top"`` on a weight whose
top ``rank`` singular values stand well clear of the rest (the same window every time: the case
where round-to-nearest can drop an update, since nothing moves ``w_fixed`` off the bf16 grid).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rosa_scale without an install

from rosa_scale.config import RosaConfig  # noqa: E402
from rosa_scale.factorize import window_generator  # noqa: E402
from rosa_scale.layer import resplit_values  # noqa: E402

STORAGES = {  # name -> (storage dtype of w_fixed, RosaConfig options)
    "bf16_nearest": (torch.bfloat16, {}),
    "bf16_stochastic": (torch.bfloat16, {"stochastic_rounding": True}),
    "fp32": (torch.float32, {"fixed_dtype": "float32"}),
}
SIZES = (1e-4, 1e-3, 1e-2)
DRIFT_KS = (1, 10, 100)
NAME = "layers.0.mlp.up_proj"  # the matrix name that seeds the windows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file (flat keys)")
    p.add_argument("--size", type=int, default=4096, help="the weight is size x size")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--method", choices=["svd", "eigh", "qr"], default="qr",
                   help="factorizer for the main parts (svd of 4096x4096 takes about a minute on 2 CPU cores)")
    p.add_argument("--phases", type=int, default=50, help="phases of the accumulation part")
    p.add_argument("--parts", default="survival,drift,accumulation")
    p.add_argument("--check-size", type=int, default=1024, help="size of the SVD survival check (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def weight_f64(state) -> torch.Tensor:
    """The layer's weight ``w_fixed + up @ down``, exactly (float64)."""
    w, up, down = state
    return w.double() + up.double() @ down.double()


def resample(state, k: int, cfg: RosaConfig, rank: int):
    w, up, down = state
    gen = window_generator(cfg.seed, k, NAME)
    return resplit_values(w, up, down, transposed=False, rank=rank, generator=gen, config=cfg)


def first_split(w_model: torch.Tensor, storage: str, cfg: RosaConfig, rank: int):
    """What apply_rosa does: zero factors around the (bf16) model weight, then split index 0."""
    dtype, _ = STORAGES[storage]
    n_out, n_in = w_model.shape
    zeros_up, zeros_down = torch.zeros(n_out, rank), torch.zeros(rank, n_in)
    return resample((w_model.to(dtype), zeros_up, zeros_down), 0, cfg, rank)


def trained_update(up, down, rel_size: float, w_norm: float, gen: torch.Generator):
    """Trained factors ``up + du``, ``down + dd`` (fp32, random changes) and the update they make,
    ``(up+du)(down+dd) - up down``, exactly (float64).

    Scaled so that its first-order part ``du down + up dd`` has norm ``rel_size * w_norm`` (the
    second-order ``du dd`` is far smaller; the achieved size is reported).
    """
    gu = torch.randn(up.shape, generator=gen, dtype=torch.float64)
    gd = torch.randn(down.shape, generator=gen, dtype=torch.float64)
    up64, down64 = up.double(), down.double()
    # |gu down + up gd|^2 from r x r products: <A B, C D> = tr((A^T C)(D B^T)).
    sq = (torch.trace((gu.T @ gu) @ (down64 @ down64.T)) + torch.trace((up64.T @ up64) @ (gd @ gd.T))
          + 2 * torch.trace((gu.T @ up64) @ (gd @ down64.T)))
    scale = rel_size * w_norm / float(sq.sqrt())
    new_up, new_down = up + (scale * gu).float(), down + (scale * gd).float()
    # (nu - up) down + nu (nd - down) = nu nd - up down; differences of fp32 values are exact in fp64.
    delta = (new_up.double() - up64) @ down64 + new_up.double() @ (new_down.double() - down64)
    return new_up, new_down, delta


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.norm() / b.norm())


def survival_part(w_model, cfgs, rank, prefix, out, log):
    gen = torch.Generator().manual_seed(1234)
    start = {s: first_split(w_model, s, cfg, rank) for s, cfg in cfgs.items()}
    for size in SIZES:
        # The same factor change for every storage, drawn on the bf16-nearest split's factors.
        w0 = weight_f64(start["bf16_nearest"])
        new_up, new_down, delta = trained_update(*start["bf16_nearest"][1:], size, float(w0.norm()), gen)
        for storage, cfg in cfgs.items():
            w, up, down = start[storage]
            assert torch.equal(up, start["bf16_nearest"][1])  # the same split factors for every storage
            before = weight_f64((w, up, down))
            trained = (w, new_up, new_down)
            after = weight_f64(resample(trained, 1, cfg, rank))
            eff = after - before
            key = f"{storage}_{size:.0e}".replace("e-0", "e-")
            out[f"{prefix}survival_{key}"] = float((eff * delta).sum() / (delta * delta).sum())
            out[f"{prefix}rel_error_{key}"] = rel(eff - delta, delta)
            out[f"{prefix}delta_rel_size_{key}"] = rel(delta, before)
            log(f"{prefix}survival {key}: {out[f'{prefix}survival_{key}']:.4f} "
                f"rel_error {out[f'{prefix}rel_error_{key}']:.3g}")


def drift_part(w_model, cfgs, rank, out, log):
    for storage, cfg in cfgs.items():
        state = first_split(w_model, storage, cfg, rank)
        w0 = weight_f64(state)
        for k in range(1, max(DRIFT_KS) + 1):
            state = resample(state, k, cfg, rank)
            if k in DRIFT_KS:
                out[f"drift_{storage}_k{k}"] = rel(weight_f64(state) - w0, w0)
                log(f"drift {storage} k={k}: {out[f'drift_{storage}_k{k}']:.3g}")


def accumulation_part(w_model, cfgs, rank, phases, out, log):
    for storage, cfg in cfgs.items():
        gen = torch.Generator().manual_seed(5678)  # the same updates for every storage
        state = first_split(w_model, storage, cfg, rank)
        w0 = weight_f64(state)
        total = torch.zeros_like(w0)
        for p in range(1, phases + 1):
            w, up, down = state
            new_up, new_down, delta = trained_update(up, down, 1e-3, float(w0.norm()), gen)
            total += delta
            state = resample((w, new_up, new_down), p, cfg, rank)
        final = weight_f64(state)
        exported = (final.float().to(torch.bfloat16)).double()  # merge_rosa into a bf16 model
        for suffix, w_end in (("", final), ("_exported_bf16", exported)):
            out[f"accum_{storage}{suffix}"] = rel(w_end - (w0 + total), total)
            out[f"accum_survival_{storage}{suffix}"] = float(((w_end - w0) * total).sum() / (total * total).sum())
        out["accum_sum_delta_rel_size"] = rel(total, w0)
        log(f"accum {storage}: {out[f'accum_{storage}']:.3g} "
            f"(after bf16 export {out[f'accum_{storage}_exported_bf16']:.3g})")


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    def configs(method, sampling="random"):
        return {s: RosaConfig(rank=args.rank, method=method, sampling=sampling, seed=args.seed, **opts)
                for s, (_, opts) in STORAGES.items()}

    def model_weight(size, spiked=False):  # a bf16 model weight, as the model holds it
        g = torch.Generator().manual_seed(args.seed)
        w = 0.02 * torch.randn(size, size, generator=g)
        if spiked:  # rank singular values at 3-6x the edge of the noise spectrum (2 * 0.02 * sqrt(size))
            u, _ = torch.linalg.qr(torch.randn(size, args.rank, generator=g))
            v, _ = torch.linalg.qr(torch.randn(size, args.rank, generator=g))
            s = 2 * 0.02 * size**0.5 * torch.linspace(6, 3, args.rank)
            w += (u * s) @ v.T
        return w.to(torch.bfloat16)

    out = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
           "threads": torch.get_num_threads(), "size": args.size, "rank": args.rank, "method": args.method,
           "sampling": "random", "phases": args.phases, "seed": args.seed}
    parts = args.parts.split(",")
    w_model = model_weight(args.size)
    out["weight_std"] = float(w_model.float().std())
    if "survival" in parts:
        survival_part(w_model, configs(args.method), args.rank, "", out, log)
    if "drift" in parts:
        drift_part(w_model, configs(args.method), args.rank, out, log)
    if "accumulation" in parts:
        accumulation_part(w_model, configs(args.method), args.rank, args.phases, out, log)
    if args.check_size:
        out["check_size"] = args.check_size
        survival_part(model_weight(args.check_size), configs("svd"), args.rank, "check_svd_random_", out, log)
        survival_part(model_weight(args.check_size, spiked=True), configs("svd", "top"), args.rank,
                      "check_svd_top_spiked_", out, log)
    out["seconds"] = round(time.time() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
