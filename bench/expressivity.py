"""Expressivity at scale: ROSA r=8 vs LoRA r=8 vs the best rank-8 update, on one 1024x1024 layer.

    python bench/expressivity.py                                  # the dated run, into bench/results/
    python bench/expressivity.py --size 64 --rank 2 --steps 300 --out /tmp/x   # seconds

One ``nn.Linear(n, n, bias=False)`` starts at ``W0 = G / sqrt(n)`` and is regressed onto
``W* = W0 + Delta`` with a full-rank ``Delta``. LoRA trains a single rank-r update, so its error
can never go below the Eckart-Young floor ``|Delta - Delta_r|_F / |Delta|_F``; ROSA trains a new
rank-r subspace after each resample, so it can. Two spectra of ``Delta`` (same Frobenius norm):

    flat   a Gaussian matrix: no preferred directions, the top r hold ~4r/n of the energy, so the
           floor is near 1. The case the method is built for: the update is not low-rank at all.
    power  singular values ~ i^-decay on random singular vectors: most energy in a few directions,
           so the floor is low. The case LoRA is built for; it shows what ROSA gives up there.

The inputs are one fixed batch ``x = sqrt(n) Q`` with ``Q`` a random orthogonal matrix, so
``x.T x / n = I`` exactly: the MSE equals the population loss of x ~ N(0, I) (no sampling noise,
no overfitting, a well-conditioned problem; a square Gaussian batch would be nearly singular),
while the layer still sees real inputs. The error tracked is ``|W_eff - W*|_F / |Delta|_F`` (1 at
the start, 0 at the target); the loss is ``|W_eff - W*|_F^2 / n``, so the lowest final error is the
lowest final loss; errors are measured in float64. Each method's learning rate is the best of
``--lrs`` (full fine-tuning: ``--full-lrs``), near-ties going to the faster curve; ``--k-check``
reruns ROSA with other resample intervals at its chosen rate.
ROSA has a floor too: each phase changes W by ``up1 down1 - up0 down0`` (rank <= 2r), so after P
phases its error is at least the rank-min(n, 2rP) optimum (``*_rosa_r8_floor``).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rosa_scale without an install

from rosa_scale import RosaConfig, apply_rosa, resample, rosa_layers  # noqa: E402

DATE = "2026-11-28"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the json, md and png")
    p.add_argument("--name", default=f"expressivity-{DATE}", help="file stem of the outputs")
    p.add_argument("--size", type=int, default=1024, help="the layer is size x size")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000, help="Adam steps of ROSA and LoRA")
    p.add_argument("--resample-every", type=int, default=10,
                   help="ROSA steps between resamples (K); --k-check tries others at the same lr")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates swept for ROSA and LoRA")
    p.add_argument("--full-lrs", default="3e-4,1e-3,3e-3", help="learning rates of full fine-tuning ('' skips it)")
    p.add_argument("--full-steps", type=int, default=400, help="full fine-tuning converges fast; its curve stops here")
    p.add_argument("--k-check", default="5,25", help="other resample intervals to try at ROSA's chosen lr ('' skips)")
    p.add_argument("--spectra", default="flat,power", help="spectra of Delta to run, from: flat, power")
    p.add_argument("--decay", type=float, default=1.0, help="exponent of the power spectrum")
    p.add_argument("--delta-scale", type=float, default=0.5, help="|Delta|_F / |W0|_F")
    p.add_argument("--method", choices=["svd", "eigh", "qr"], default="svd", help="ROSA factorizer")
    p.add_argument("--eval-every", type=int, default=25, help="steps between points of the error curves")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--no-plot", action="store_true", help="skip the png (matplotlib not needed)")
    return p.parse_args(argv)


@dataclass
class Problem:
    """The layer's start ``w0``, its ``target`` (both fp32), and the batch with its targets."""

    w0: torch.Tensor
    target: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        """``target - w0`` exactly (float64): what every error and optimum is measured against."""
        return self.target.double() - self.w0.double()

    def rel_error(self, w_eff: torch.Tensor) -> float:
        """In float64: a float32 norm of 10^6 entries is off by ~1e-5, enough to 'beat' Eckart-Young."""
        return float((w_eff.detach().double() - self.target.double()).norm() / self.delta.norm())


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian with the signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def make_delta(n: int, spectrum: str, decay: float, g: torch.Generator) -> torch.Tensor:
    """Full-rank Delta with unit Frobenius norm; 'flat' Gaussian or 'power' (s_i ~ i^-decay)."""
    if spectrum == "flat":
        delta = torch.randn(n, n, generator=g)
    elif spectrum == "power":
        s = torch.arange(1, n + 1, dtype=torch.float32) ** -decay
        delta = (random_orthogonal(n, g) * s) @ random_orthogonal(n, g).T
    else:
        raise ValueError(f"unknown spectrum {spectrum!r}; choose flat or power")
    return delta / delta.norm()


def make_problem(n: int, spectrum: str, decay: float, delta_scale: float, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, n, generator=g) / n**0.5
    delta = make_delta(n, spectrum, decay, g) * delta_scale * w0.norm()
    target = w0 + delta
    x = random_orthogonal(n, g) * n**0.5  # x.T @ x = n I: the MSE is the population loss
    return Problem(w0, target, x, x @ target.T)


def rank_optimum(delta: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the error of the best rank-``rank`` update, |Delta - Delta_r|_F / |Delta|_F."""
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    return float((s2[rank:].sum() / s2.sum()).sqrt())


def equivalent_rank(delta: torch.Tensor, err: float, rtol: float = 1e-9) -> int:
    """The smallest k whose best rank-k update is at least as good as error ``err`` (to ``rtol``:
    a converged LoRA sits on its optimum up to float64 rounding, and must count as rank r)."""
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    tail = (s2.flip(0).cumsum(0).flip(0) / s2.sum()).sqrt()  # tail[k] = rank-k optimum
    below = torch.nonzero(tail <= err * (1 + rtol))
    return int(below[0]) if len(below) else len(s2)


def _loss(out: torch.Tensor, p: Problem) -> torch.Tensor:
    return F.mse_loss(out, p.y)


def train_rosa(p: Problem, rank: int, lr: float, steps: int, every: int, method: str, seed: int,
               eval_every: int) -> list[float]:
    """Adam on ROSA's factors, ``resample`` every ``every`` steps; the error every ``eval_every`` steps."""
    layer = nn.Linear(p.w0.shape[1], p.w0.shape[0], bias=False)
    layer.weight.data.copy_(p.w0)
    net = apply_rosa(nn.Sequential(layer), RosaConfig(rank=rank, method=method, sampling="random", seed=seed))
    rosa = rosa_layers(net)["0"]
    opt = torch.optim.Adam([rosa.up, rosa.down], lr=lr)
    curve = [p.rel_error(rosa.merged_weight())]
    for step in range(1, steps + 1):
        opt.zero_grad()
        _loss(net(p.x), p).backward()
        opt.step()
        if step % every == 0 and step < steps:
            resample(net, opt)  # the function is unchanged, so the curve is too
        if step % eval_every == 0:
            curve.append(p.rel_error(rosa.merged_weight()))
    return curve


def train_lora(p: Problem, rank: int, lr: float, steps: int, seed: int, eval_every: int) -> list[float]:
    """The usual LoRA: down ~ N(0, 1/in), up = 0, so W_eff = W0 + up @ down starts at W0."""
    g = torch.Generator().manual_seed(seed + 1)
    down = nn.Parameter(torch.randn(rank, p.w0.shape[1], generator=g) / p.w0.shape[1] ** 0.5)
    up = nn.Parameter(torch.zeros(p.w0.shape[0], rank))
    opt = torch.optim.Adam([up, down], lr=lr)
    curve = [p.rel_error(p.w0)]
    for step in range(1, steps + 1):
        opt.zero_grad()
        _loss(F.linear(p.x, p.w0) + F.linear(F.linear(p.x, down), up), p).backward()
        opt.step()
        if step % eval_every == 0:
            curve.append(p.rel_error(p.w0.double() + up.detach().double() @ down.detach().double()))
    return curve


def train_full(p: Problem, lr: float, steps: int, eval_every: int) -> list[float]:
    """Adam on the whole matrix: the reference every adapter is compared with."""
    w = nn.Parameter(p.w0.clone())
    opt = torch.optim.Adam([w], lr=lr)
    curve = [p.rel_error(w)]
    for step in range(1, steps + 1):
        opt.zero_grad()
        _loss(F.linear(p.x, w), p).backward()
        opt.step()
        if step % eval_every == 0:
            curve.append(p.rel_error(w))
    return curve


def best_lr(curves: dict[float, list[float]], tie: float = 1e-3) -> float:
    """The lr of the lowest final error (= lowest final loss); finals within ``tie`` (relative) of it
    count as tied and go to the faster curve (lower mean error): LoRA ends on its floor at every lr."""
    lowest = min(c[-1] for c in curves.values())
    tied = [lr for lr, c in curves.items() if c[-1] <= lowest * (1 + tie)]
    return min(tied, key=lambda lr: sum(curves[lr]) / len(curves[lr]))


def sweep(name: str, train, lrs: list[float], out: dict, log) -> None:
    """Train at every lr; keep the curve of the best one (``best_lr``)."""
    curves = {}
    for lr in lrs:
        start = time.perf_counter()
        curves[lr] = train(lr)
        out[f"{name}_sweep_lr{lr:g}_final"] = curves[lr][-1]
        log(f"  {name} lr={lr:g}: final {curves[lr][-1]:.4f} ({time.perf_counter() - start:.0f} s)")
    lr = best_lr(curves)
    out[f"{name}_lr"], out[f"{name}_curve"], out[f"{name}_final"] = lr, curves[lr], curves[lr][-1]


def first_step_below(curve: list[float], level: float, eval_every: int) -> int | None:
    """The first tracked step whose error is below ``level`` (None if never)."""
    return next((i * eval_every for i, v in enumerate(curve) if v < level), None)


def run_spectrum(spectrum: str, args, out: dict, log) -> None:
    """Every method on one spectrum of Delta; keys are prefixed with the spectrum's name."""
    r, k, n = args.rank, args.resample_every, args.size
    p = make_problem(n, spectrum, args.decay, args.delta_scale, args.seed)
    delta = p.delta
    pre, rosa, lora = f"{spectrum}_rel_err_", f"{spectrum}_rel_err_rosa_r{r}", f"{spectrum}_rel_err_lora_r{r}"
    optimum = out[f"{pre}rank{r}_optimum"] = rank_optimum(delta, r)
    log(f"{spectrum}: rank-{r} optimum {optimum:.4f}")
    lrs = [float(v) for v in args.lrs.split(",")]
    sweep(rosa, lambda lr: train_rosa(p, r, lr, args.steps, k, args.method, args.seed, args.eval_every), lrs, out, log)
    sweep(lora, lambda lr: train_lora(p, r, lr, args.steps, args.seed, args.eval_every), lrs, out, log)
    if args.full_lrs:
        sweep(f"{pre}full", lambda lr: train_full(p, lr, args.full_steps, args.eval_every),
              [float(v) for v in args.full_lrs.split(",")], out, log)
    # Each phase changes W by up1 @ down1 - up0 @ down0 (rank <= 2r): ROSA's own floor after P phases.
    phases = -(-args.steps // k)
    out[f"{spectrum}_rosa_r{r}_phases"] = phases
    out[f"{spectrum}_rosa_r{r}_floor_rank"] = min(n, 2 * r * phases)
    out[f"{rosa}_floor"] = rank_optimum(delta, min(n, 2 * r * phases))
    for name, label in ((rosa, f"rosa_r{r}"), (lora, f"lora_r{r}")):
        out[f"{spectrum}_{label}_equivalent_rank"] = equivalent_rank(delta, out[f"{name}_final"])
    out[f"{spectrum}_rosa_r{r}_steps_below_optimum"] = first_step_below(out[f"{rosa}_curve"], optimum,
                                                                        args.eval_every)
    # LoRA's approach to its floor: 99% of the way from the start (error 1) down to the optimum.
    out[f"{spectrum}_lora_r{r}_steps_to_99pct_of_optimum"] = first_step_below(
        out[f"{lora}_curve"], optimum + 0.01 * (1 - optimum), args.eval_every)
    for kk in (int(v) for v in args.k_check.split(",") if v):
        lr = out[f"{rosa}_lr"]
        curve = train_rosa(p, r, lr, args.steps, kk, args.method, args.seed, args.eval_every)
        out[f"{rosa}_k{kk}_final"] = curve[-1]
        log(f"  rosa K={kk} lr={lr:g}: final {curve[-1]:.4f}")


def plot(out: dict, args, path: Path) -> None:
    """Error vs step, log-y, one panel per spectrum; the dashed line is the rank-r optimum.

    The y-axis is fitted to the adapters: full fine-tuning falls through its bottom within a few
    hundred steps, so its final error is in the legend instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spectra = args.spectra.split(",")
    fig, axes = plt.subplots(1, len(spectra), figsize=(6.5 * len(spectra), 4.5), squeeze=False)
    r = args.rank
    for ax, spectrum in zip(axes[0], spectra, strict=True):
        pre = f"{spectrum}_rel_err_"
        optimum = out[f"{pre}rank{r}_optimum"]
        for key, label, color in ((f"rosa_r{r}", f"ROSA r={r}, resample every {args.resample_every}", "C0"),
                                  (f"lora_r{r}", f"LoRA r={r}", "C1"), ("full", "full fine-tuning", "C2")):
            if f"{pre}{key}_curve" in out:
                curve = out[f"{pre}{key}_curve"]
                steps = [i * args.eval_every for i in range(len(curve))]
                extra = f", {curve[-1]:.0e} at step {steps[-1]}" if key == "full" else ""
                ax.plot(steps, curve, color=color, lw=2.5 if key.startswith("lora") else 1.5,
                        label=f"{label} (lr {out[f'{pre}{key}_lr']:g}{extra})")
        ax.axhline(optimum, color="k", ls="--", lw=1, label=f"best rank-{r} update (Eckart-Young)")
        lowest = min(optimum, *out[f"{pre}rosa_r{r}_curve"], *out[f"{pre}lora_r{r}_curve"])
        ax.set_yscale("log")
        ax.set_ylim(lowest / 2, 1.1)
        ax.set_xlim(0, args.steps)
        ax.set_xlabel("Adam step")
        ax.set_ylabel("|W_eff - W*|_F / |Delta|_F")
        kind = "flat spectrum (Gaussian)" if spectrum == "flat" else f"spectrum s_i ~ i^-{args.decay:g}"
        ax.set_title(f"{args.size}x{args.size} layer, full-rank Delta, {kind}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _join(spectra: list[str], text) -> str:
    """'text(flat) (flat), text(power) (power)'."""
    return ", ".join(f"{text(sp)} ({sp})" for sp in spectra)


def summary(out: dict, args) -> list[str]:
    """What the numbers say, in sentences computed from them (including where ROSA does not win)."""
    r, ee, spectra = args.rank, args.eval_every, args.spectra.split(",")
    k0 = args.resample_every

    def get(sp, key):
        return out[f"{sp}_rel_err_{key}"]
    wins = [sp for sp in spectra if get(sp, f"rosa_r{r}_final") < get(sp, f"rank{r}_optimum")]
    gap = max(get(sp, f"lora_r{r}_final") / get(sp, f"rank{r}_optimum") - 1 for sp in spectra)
    s = [f"Final error, ROSA / LoRA / best rank-{r} update: " + _join(spectra, lambda sp: (
            f"{get(sp, f'rosa_r{r}_final'):.3f} / {get(sp, f'lora_r{r}_final'):.3f} / "
            f"{get(sp, f'rank{r}_optimum'):.3f}")) + "; ROSA ends "
         + (f"below the rank-{r} optimum on {', '.join(wins)}" if wins else f"above the rank-{r} optimum everywhere")
         + " (as good as the best rank-" + "/".join(str(out[f"{sp}_rosa_r{r}_equivalent_rank"]) for sp in spectra)
         + f" update), while LoRA ends on it ({gap:.0e} above, relative), as no rank-{r} update can do better."]
    ahead = {}
    for sp in spectra:
        pairs = zip(get(sp, f"lora_r{r}_curve"), get(sp, f"rosa_r{r}_curve"), strict=True)
        steps = [i * ee for i, (lo, ro) in enumerate(pairs) if i and lo < ro]
        if steps:
            ahead[sp] = steps[-1]
    if ahead:
        s.append("ROSA does not win early: LoRA has the lower error up to step " + _join(list(ahead), ahead.get)
                 + "; it is 99% of the way to its floor by step "
                 + _join(spectra, lambda sp: out[f"{sp}_lora_r{r}_steps_to_99pct_of_optimum"])
                 + ", and ROSA first goes below that floor at step "
                 + _join(spectra, lambda sp: out[f"{sp}_rosa_r{r}_steps_below_optimum"]) + ".")
    else:
        s.append("ROSA has the lower error at every tracked step.")
    spread = {(sp, m): max(v) / min(v) for sp in spectra for m in ("rosa", "lora")
              for v in [[x for k, x in out.items() if k.startswith(f"{sp}_rel_err_{m}_r{r}_sweep_lr")]]}
    worse = [f"lr {k.split('_sweep_lr')[1][:-6]} ({sp})" for sp in spectra for k, x in out.items()
             if k.startswith(f"{sp}_rel_err_rosa_r{r}_sweep_lr") and x >= get(sp, f"lora_r{r}_final")]
    s.append(f"ROSA needs its learning rate tuned: across {{{args.lrs}}} its final error varies by "
             + _join(spectra, lambda sp: f"{spread[sp, 'rosa']:.2f}x") + ", LoRA's by "
             + _join(spectra, lambda sp: f"{spread[sp, 'lora']:.3f}x")
             + (f"; at {', '.join(worse)} ROSA ends no better than LoRA." if worse else "."))
    ks = {sp: {k0: get(sp, f"rosa_r{r}_final"), **{int(k.split("_k")[-1][:-6]): x for k, x in out.items()
               if k.startswith(f"{sp}_rel_err_rosa_r{r}_k") and k.endswith("_final")}} for sp in spectra}
    if any(len(v) > 1 for v in ks.values()):
        better = [sp for sp in spectra if min(ks[sp], key=ks[sp].get) != k0]
        s.append("So does the resample interval: at ROSA's chosen lr, " + _join(spectra, lambda sp: ", ".join(
            f"K={k} {x:.3f}" for k, x in sorted(ks[sp].items())))
                 + (f"; K={k0} is not ROSA's best on {', '.join(better)}, so the headline ROSA numbers there "
                    f"are not its best either (K was only checked at the lr chosen for K={k0})." if better
                    else f"; K={k0} is the best of these on every spectrum."))
    if all(f"{sp}_rel_err_full_final" in out for sp in spectra):
        s.append("Full fine-tuning, the reference, reaches " + _join(spectra, lambda sp: f"{get(sp, 'full_final'):.1e}")
                 + f" within {args.full_steps} steps, against ROSA's " + _join(spectra, lambda sp: (
                     f"{get(sp, f'rosa_r{r}_final'):.3f}")) + f" after {args.steps}.")
    return s


def _cell(out: dict, name: str) -> str:
    """'final (lr)' of one method, '-' if it did not run."""
    return f"{out[name + '_final']:.4g} ({out[name + '_lr']:g})" if name + "_final" in out else "-"


def markdown(out: dict, args) -> str:
    """A table of the final errors and sentences computed from them (no number here is typed in)."""
    r, spectra = args.rank, args.spectra.split(",")
    title = f"# Expressivity at {args.size}x{args.size}: ROSA r={r} vs LoRA r={r} vs the best rank-{r} update ({DATE})"
    setup = (f"`python bench/expressivity.py` ({out['seconds']:.0f} s, CPU, {out['threads']} thread, torch "
             f"{out['torch']}). One {args.size}x{args.size} linear layer from W0 = G/sqrt(n) regressed onto "
             f"W* = W0 + Delta, Delta full-rank with |Delta|/|W0| = {args.delta_scale:g}; a whitened fixed batch "
             f"(the MSE is the population loss of x ~ N(0, I)). {args.steps} Adam steps for ROSA (`{args.method}`, "
             f"random window, `resample` every {args.resample_every} steps, optimizer state reset) and for LoRA "
             f"(down ~ N(0, 1/n), up = 0); full fine-tuning {args.full_steps} steps. Error = "
             f"|W_eff - W*|_F / |Delta|_F. Each learning rate is the best final error of {{{args.lrs}}} "
             f"(full fine-tuning {{{args.full_lrs}}}). Curves: `{args.name}.png`; all numbers: `{args.name}.json`.")
    header = (f"| Delta spectrum | rank-{r} optimum | ROSA r={r} (lr) | LoRA r={r} (lr) | full FT (lr) "
              f"| ROSA = best rank-k | LoRA = best rank-k |")
    lines = [title, "", setup, "", header, "|---|---|---|---|---|---|---|"]
    for sp in spectra:
        pre = f"{sp}_rel_err_"
        cells = [_cell(out, pre + key) for key in (f"rosa_r{r}", f"lora_r{r}", "full")]
        lines.append(f"| {sp} | {out[f'{pre}rank{r}_optimum']:.4f} | {' | '.join(cells)} "
                     f"| {out[f'{sp}_rosa_r{r}_equivalent_rank']} "
                     f"| {out[f'{sp}_lora_r{r}_equivalent_rank']} |")
    lines += ["", "Learning-rate sweeps (final error) and the resample-interval check (ROSA at its chosen lr):", ""]
    for sp in spectra:
        for key in (f"rosa_r{r}", f"lora_r{r}", "full"):
            sw = [f"{k.split('_sweep_lr')[1][:-6]}: {v:.4g}" for k, v in out.items()
                  if k.startswith(f"{sp}_rel_err_{key}_sweep_lr")]
            if sw:
                lines.append(f"- {sp}, {key}: " + ", ".join(sw))
        ks = [f"K={k.split('_k')[-1][:-6]}: {v:.4f}" for k, v in out.items()
              if k.startswith(f"{sp}_rel_err_rosa_r{r}_k") and k.endswith("_final")]
        if ks:
            lines.append(f"- {sp}, ROSA resample interval: K={args.resample_every}: "
                         f"{out[f'{sp}_rel_err_rosa_r{r}_final']:.4f}, " + ", ".join(ks))
    lines += ["", "## What the numbers show", "", " ".join(summary(out, args)), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)  # noqa: E731
    out = {"date": DATE, "torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
           "size": args.size, "rank": args.rank, "steps": args.steps, "full_steps": args.full_steps,
           "resample_every": args.resample_every, "method": args.method, "sampling": "random",
           "lrs": args.lrs, "full_lrs": args.full_lrs, "delta_scale": args.delta_scale, "decay": args.decay,
           "spectra": args.spectra, "eval_every": args.eval_every, "seed": args.seed}
    for spectrum in args.spectra.split(","):
        run_spectrum(spectrum, args, out, log)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / f"{args.name}.md").write_text(markdown(out, args))
    if not args.no_plot:
        plot(out, args, folder / f"{args.name}.png")
    log(f"wrote {folder / args.name}.{{json,md{'' if args.no_plot else ',png'}}}")
    return out


if __name__ == "__main__":
    main()
