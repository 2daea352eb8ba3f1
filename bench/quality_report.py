"""Summarize the quality study's per-run JSON files: flat-key JSON, a markdown table, loss curves.

For each corpus, method and rank the learning rate is the sweep's best on validation loss
(seed 0); its test perplexity is averaged over the seeds that ran at that rate. Runs the study
still owes (missing sweep rates, seeds, ablations) are listed, never guessed.

``--quantized`` summarizes issue #16's rows instead (``quantized_summary``): ROSA and PEFT LoRA over a
frozen NF4 base against the same methods over the unquantized base, with the merged update's survival
at each resample measured in the runs and, for reference, in the synthetic survival benches.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import quality

WHERE = {"weight": "GPU", "cpu": "CPU"}
ABLATED = ("austen", "rosa", 16)
NAMES = {"full": "Full fine-tuning", "lora": "PEFT LoRA", "rosa": "ROSA", "base": "no fine-tuning"}
RESULTS = Path(__file__).resolve().parent / "results"
# Issue #16's rows: (key, method, ablation, what the base is). All Austen, r=16, at the rate of the
# unquantized method's sweep; "bf16" in the keys names the unquantized base (see the md).
QUANT_ROWS = [
    ("rosa_nf4", "rosa-nf4", None, "NF4 (frozen Linear4bit, bf16 stack of finished windows)"),
    ("rosa_bf16", "rosa", None, "unquantized, stored fp32 (w_fixed fp32), bf16 autocast"),
    ("qlora", "qlora", None, "NF4 (the same frozen Linear4bit layers)"),
    ("lora", "lora", None, "unquantized, stored fp32, bf16 autocast"),
    ("rosa_bf16_stored", "rosa", quality.BF16_STORED, "unquantized, stored bf16 (w_fixed re-rounded to bf16 at each resample)"),
    *((f"rosa_nf4_err{fit['quant_error_rank']}", "rosa-nf4", fit,
       f"NF4, stack started at the rank-{fit['quant_error_rank']} fit of the quantization error")
      for fit in quality.ERROR_FITS),
]
QUANT_NAMES = {"rosa_nf4": "ROSA, NF4 base", "rosa_bf16": "ROSA, unquantized base", "qlora": "PEFT QLoRA (NF4)",
               "lora": "PEFT LoRA, unquantized base", "rosa_bf16_stored": "ROSA, bf16-stored base (reference)",
               **{f"rosa_nf4_err{f['quant_error_rank']}": f"ROSA, NF4 base, quant_error_rank {f['quant_error_rank']}"
                  for f in quality.ERROR_FITS}}
# Survival of one merged update of size 1e-2 |W| in the synthetic benches: (file, key, what).
SURVIVAL_BENCH = {
    "nf4_stack": ("quant-survival-2026-11-30-h200-4096x4096.json", "survival_stack_bf16_nf4_1e-2",
                  "NF4 base + bf16 stack (ROSA's design), 4096x4096 N(0, 0.02^2), one H200"),
    "nf4_inplace": ("quant-survival-2026-11-30-h200-4096x4096.json", "survival_inplace_nf4_1e-2",
                    "NF4 re-quantized in place (the design ROSA refuses), 4096x4096, one H200"),
    "bf16_wfixed": ("bf16-merge-survival-2026-11-28.json", "survival_bf16_nearest_1e-2",
                    "w_fixed stored bf16 (round to nearest), 4096x4096, CPU"),
    "fp32_wfixed": ("bf16-merge-survival-2026-11-28.json", "survival_fp32_1e-2",
                    "w_fixed stored fp32, 4096x4096, CPU"),
}


def _key(method: str, rank) -> str:
    return method if rank is None else f"{method}_r{rank}"


def _cell(results: dict, corpus: str, method: str, rank) -> dict | None:
    lr = quality.best_lr(results, corpus, method, rank)
    if lr is None:
        return None
    runs = [r for r in results.values() if r["spec"]["corpus"] == corpus and r["spec"]["method"] == method
            and r["spec"].get("rank") == rank and r["spec"]["lr"] == lr and not r["spec"].get("ablation")]
    ppl = [r["test_ppl"] for r in runs]
    seed0 = next(r for r in runs if r["spec"]["seed"] == 0)
    swept = sorted(r["spec"]["lr"] for r in quality.swept_runs(results, corpus, method, rank))
    return {"lr": lr, "lrs_swept": swept, "bracketed": swept[0] < lr < swept[-1]
            and set(quality.LR_GRID[method]) <= set(swept),
            "ppl": statistics.mean(ppl), "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "seeds": len(ppl), "val_loss": seed0["val_loss"], "params": seed0["trainable_params"],
            "tok_s": seed0.get("tok_s"),
            "tok_s_between_resamples": seed0["tokens"] / (seed0["train_s"] - seed0["resample_s"]) if "train_s" in seed0 else None,
            "peak_gib": seed0["peak_gib"], "curve": seed0["curve"],
            "resample_s": seed0["resample_s"], "resamples": seed0["resamples"],
            "factorize_device": seed0.get("factorize_device", "weight")}


def summarize(results: dict) -> tuple[dict, dict]:
    """(flat keys for the JSON, cells per corpus for the table and plot)."""
    flat, cells = {}, {}
    for corpus in quality.CORPORA:
        prefix = "" if corpus == "austen" else f"{corpus}_"
        base = [r for r in results.values() if r["spec"]["corpus"] == corpus and r["spec"]["method"] == "base"]
        if base:
            flat[f"{prefix}ppl_base"] = base[0]["test_ppl"]
        cells[corpus] = {}
        for method, rank in quality.METHODS:
            cell = _cell(results, corpus, method, rank)
            if cell is None:
                continue
            cells[corpus][(method, rank)] = cell
            k = _key(method, rank)
            flat[f"{prefix}ppl_{k}"] = cell["ppl"]
            flat[f"{prefix}ppl_{k}_std"] = cell["ppl_std"]
            flat[f"{prefix}ppl_{k}_seeds"] = cell["seeds"]
            flat[f"{prefix}lr_{k}"] = cell["lr"]
            flat[f"{prefix}lr_{k}_bracketed"] = cell["bracketed"]
            flat[f"{prefix}lrs_swept_{k}"] = cell["lrs_swept"]
            flat[f"{prefix}val_loss_{k}"] = cell["val_loss"]
            flat[f"{prefix}trainable_params_{k}"] = cell["params"]
            flat[f"{prefix}tok_s_{k}"] = cell["tok_s"]
            flat[f"{prefix}tok_s_between_resamples_{k}"] = cell["tok_s_between_resamples"]
            flat[f"{prefix}peak_gib_{k}"] = cell["peak_gib"]
            if method == "rosa":
                flat[f"{prefix}resample_s_{k}"] = cell["resample_s"] / max(1, cell["resamples"])
    for r in results.values():
        ab = r["spec"].get("ablation")
        if ab and r["spec"]["seed"] == 0:  # an ablation is one seed; more seeds of one are quantized_summary's
            spec = r["spec"]
            cell = (spec["corpus"], spec["method"], spec.get("rank"))
            name = "_".join(f"{k}={v}" for k, v in sorted(ab.items()))
            # the ablation grid is Austen ROSA r=16; a probe of another cell names its cell
            key = f"ablation_{name}" if cell == ABLATED else f"probe_{cell[0]}_{_key(*cell[1:])}_{name}"
            flat[f"{key}_ppl"] = r["test_ppl"]
            flat[f"{key}_val_loss"] = r["val_loss"]
            flat[f"{key}_resample_s"] = r["resample_s"] / r["resamples"] if r["resamples"] else 0.0
            flat[f"{key}_factorize_device"] = r.get("factorize_device", "weight")
    return flat, cells


def _quant_runs(results: dict, method: str, ablation, lr: float) -> list[dict]:
    return sorted((r for r in results.values() if r["spec"]["corpus"] == "austen" and r["spec"]["method"] == method
                   and r["spec"].get("rank") == 16 and r["spec"]["lr"] == lr
                   and (r["spec"].get("ablation") or None) == ablation), key=lambda r: r["spec"]["seed"])


def quantized_summary(results: dict, bench_dir: Path = RESULTS) -> dict:
    """Flat keys of issue #16: ``ppl_<row>_r16`` (test perplexity, mean over seeds) with ``_std``, per-seed
    values, rates, and for ROSA rows the survival of the merged update at each resample as the runs
    measured it (``survival()`` in quality.py: norm-weighted over matrices, mean over resamples and seeds,
    and the smallest of any matrix); then the targets and the synthetic benches' survival."""
    flat = {}
    for key, method, ablation, base in QUANT_ROWS:
        lr = quality.best_lr(results, "austen", quality.family(method), 16)
        runs = _quant_runs(results, method, ablation, lr) if lr is not None else []
        if not runs:
            continue
        k, ppl = f"{key}_r16", [r["test_ppl"] for r in runs]
        flat.update({f"ppl_{k}": statistics.mean(ppl), f"ppl_{k}_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                     f"ppl_{k}_seeds": len(ppl), f"ppl_{k}_per_seed": {str(r["spec"]["seed"]): r["test_ppl"] for r in runs},
                     f"lr_{k}": lr, f"val_loss_{k}": statistics.mean(r["val_loss"] for r in runs),
                     f"untrained_val_loss_{k}": runs[0]["curve"][0][1], f"base_{k}": base,
                     f"run_ids_{k}": [r["id"] for r in runs if "id" in r],
                     f"trainable_params_{k}": runs[0]["trainable_params"],
                     f"peak_gib_{k}": max((r["peak_gib"] or 0.0) for r in runs),
                     f"tok_s_{k}": statistics.mean(r.get("tok_s") or 0.0 for r in runs)})
        measured = [s for r in runs for s in r.get("survival", [])]
        if measured:
            flat[f"survival_{k}"] = statistics.mean(s["survival"] for s in measured)
            flat[f"survival_{k}_min_matrix"] = min(s["survival_min"] for s in measured)
            flat[f"survival_{k}_resamples"] = len(measured)
            flat[f"survival_{k}_seeds"] = len([r for r in runs if r.get("survival")])
            flat[f"update_rel_{k}"] = statistics.mean(s["update_rel"] for s in measured)
            flat[f"jump_rel_{k}"] = statistics.mean(s["jump_rel"] for s in measured)
            flat[f"survival_{k}_per_resample"] = [[round(s["survival"], 6) for s in r["survival"]] for r in runs
                                                  if r.get("survival")]
    if all(f"ppl_{k}_r16" in flat for k in ("rosa_nf4", "rosa_bf16", "qlora")):
        nf4, bf16, std = flat["ppl_rosa_nf4_r16"], flat["ppl_rosa_bf16_r16"], flat["ppl_rosa_bf16_r16_std"]
        seeds = list(flat["ppl_rosa_bf16_r16_per_seed"].values())
        flat["target_rosa_nf4_beats_qlora"] = nf4 < flat["ppl_qlora_r16"]
        flat["rosa_nf4_minus_qlora"] = nf4 - flat["ppl_qlora_r16"]
        flat["rosa_nf4_minus_bf16"] = nf4 - bf16
        flat["rosa_nf4_minus_bf16_in_bf16_std"] = (nf4 - bf16) / std if std else math.inf
        # "within the seed spread": the nf4 mean no further from the bf16 mean than one bf16 seed std
        flat["target_rosa_nf4_within_bf16_spread"] = abs(nf4 - bf16) <= std
        flat["rosa_nf4_in_bf16_seed_range"] = min(seeds) <= nf4 <= max(seeds)
        # what the NF4 base itself costs: before training (validation) and after it, for each method
        flat["untrained_val_ppl_nf4"] = math.exp(flat["untrained_val_loss_rosa_nf4_r16"])
        flat["untrained_val_ppl_unquantized"] = math.exp(flat["untrained_val_loss_rosa_bf16_r16"])
        flat["nf4_cost_ppl_rosa"] = nf4 - bf16
        if "ppl_lora_r16" in flat:
            flat["nf4_cost_ppl_lora"] = flat["ppl_qlora_r16"] - flat["ppl_lora_r16"]
        for fit in quality.ERROR_FITS:  # how much of the NF4 cost the error's low-rank fit takes back
            k = f"rosa_nf4_err{fit['quant_error_rank']}"
            if f"ppl_{k}_r16" in flat:
                flat[f"{k}_minus_bf16"] = flat[f"ppl_{k}_r16"] - bf16
                flat[f"target_{k}_within_bf16_spread"] = abs(flat[f"ppl_{k}_r16"] - bf16) <= std
                flat[f"{k}_closes_frac_of_nf4_cost"] = 1 - (flat[f"ppl_{k}_r16"] - bf16) / (nf4 - bf16)
                flat[f"untrained_val_ppl_{k}"] = math.exp(flat[f"untrained_val_loss_{k}_r16"])
    for name, (file, key, what) in SURVIVAL_BENCH.items():
        path = bench_dir / file
        if path.is_file():
            flat[f"survival_bench_{name}"] = json.loads(path.read_text())[key]
            flat[f"survival_bench_{name}_source"] = f"{file}:{key} ({what})"
    # survival of a merged update at one resample, per base type: measured in the runs where they have it,
    # else the synthetic bench (fp32 w_fixed: exact by construction, never measured in a run here)
    for base, key, bench in (("nf4", "survival_rosa_nf4_r16", "nf4_stack"),
                             ("bf16", "survival_rosa_bf16_stored_r16", "bf16_wfixed"),
                             ("fp32", "survival_rosa_bf16_r16", "fp32_wfixed")):
        if key in flat:
            flat[f"survival_base_{base}"] = flat[key]
            flat[f"survival_base_{base}_source"] = f"measured in the runs ({key}, mean over resamples and seeds)"
        elif f"survival_bench_{bench}" in flat:
            flat[f"survival_base_{base}"] = flat[f"survival_bench_{bench}"]
            flat[f"survival_base_{base}_source"] = flat[f"survival_bench_{bench}_source"]
    return flat


def quantized_markdown(flat: dict) -> str:
    """The table of issue #16's rows and the survival table, from ``quantized_summary``'s keys."""
    lines = ["| method | base | lr | test PPL (mean ± std) | per seed 0 / 1 / 2 | val loss | untrained val loss | "
             "survival per resample (min matrix) | update / jump per resample |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, _, _, base in QUANT_ROWS:
        k = f"{key}_r16"
        if f"ppl_{k}" not in flat:
            continue
        seeds = " / ".join(f"{v:.2f}" for _, v in sorted(flat[f"ppl_{k}_per_seed"].items()))
        surv = (f"{flat[f'survival_{k}']:.5f} ({flat[f'survival_{k}_min_matrix']:.4f}), "
                f"{flat[f'survival_{k}_resamples']} resamples" if f"survival_{k}" in flat else "-")
        sizes = (f"{flat[f'update_rel_{k}']:.2e} / {flat[f'jump_rel_{k}']:.1e}" if f"update_rel_{k}" in flat else "-")
        lines.append(f"| {QUANT_NAMES[key]} | {base} | {flat[f'lr_{k}']:g} | {flat[f'ppl_{k}']:.2f} ± "
                     f"{flat[f'ppl_{k}_std']:.2f} | {seeds} | {flat[f'val_loss_{k}']:.4f} | "
                     f"{flat[f'untrained_val_loss_{k}']:.4f} | {surv} | {sizes} |")
    if "target_rosa_nf4_beats_qlora" in flat:
        lines += ["", f"- ROSA-NF4 beats PEFT QLoRA: **{'yes' if flat['target_rosa_nf4_beats_qlora'] else 'no'}** "
                  f"({flat['rosa_nf4_minus_qlora']:+.2f} PPL).",
                  f"- ROSA-NF4 within the seed spread of ROSA over the unquantized base: "
                  f"**{'yes' if flat['target_rosa_nf4_within_bf16_spread'] else 'no'}** "
                  f"({flat['rosa_nf4_minus_bf16']:+.2f} PPL = {flat['rosa_nf4_minus_bf16_in_bf16_std']:+.1f} of its "
                  f"seed std; inside its seeds' range: {'yes' if flat['rosa_nf4_in_bf16_seed_range'] else 'no'})."]
    bench = [n for n in SURVIVAL_BENCH if f"survival_bench_{n}" in flat]
    if bench:
        lines += ["", "| synthetic bench, one update of 1e-2 ‖W‖ | survival | source |", "|---|---|---|"]
        lines += [f"| {SURVIVAL_BENCH[n][2]} | {flat[f'survival_bench_{n}']:.4f} | `{SURVIVAL_BENCH[n][0]}` |"
                  for n in bench]
    return "\n".join(lines) + "\n"


def owed(results: dict) -> list[str]:
    """Run ids of the study's plan that have no result yet."""
    planned = quality.sweep_specs(results) + quality.final_specs(results)
    return [quality.run_id(s) for s in planned if quality.run_id(s) not in results]


def markdown(flat: dict, cells: dict, missing: list[str], setup: dict) -> str:
    lines = [f"# Quality study: SmolLM2-135M-Instruct, {setup['tokens'] / 1e6:.2f}M training tokens per run", "",
             f"{setup['steps']} steps x {setup['batch']} x {setup['seq']} tokens, AdamW, bf16 autocast, cosine, "
             "ROSA resampled every 100 steps (svd, random window, optimizer reset). Learning rate per row: the "
             "best of its sweep on validation loss (seed 0). Test PPL: mean (± std over seeds where more than one). "
             "Speeds are indicative only: 6-10 runs shared one H200 at a time.",
             ""]
    for corpus, rows in cells.items():
        test = "Persuasion (held-out novel)" if corpus == "austen" else "held-out stdlib documents"
        prefix = "" if corpus == "austen" else f"{corpus}_"
        lines += [f"## {corpus}: test = {test}", "",
                  "| method | trainable params | lr | val loss | test PPL | seeds | tok/s | tok/s without resamples | s per resample |",
                  "|---|---|---|---|---|---|---|---|---|"]
        if f"{prefix}ppl_base" in flat:
            lines.append(f"| no fine-tuning | 0 | - | - | {flat[prefix + 'ppl_base']:.2f} | - | - | - | - |")
        for (method, rank), c in rows.items():
            name = NAMES[method] + (f" r={rank}" if rank else "")
            lr = f"{c['lr']:g}" + ("" if c["bracketed"] else " (edge of sweep)")
            std = f"{c['ppl_std']:.2f}" if c["ppl_std"] >= 0.01 else f"{c['ppl_std']:.3f}"
            ppl = f"{c['ppl']:.2f}" + (f" ± {std}" if c["seeds"] > 1 else "")
            per = f"{c['resample_s'] / c['resamples']:.1f}" if c["resamples"] else "-"
            lines.append(f"| {name} | {c['params'] / 1e6:.2f}M | {lr} | {c['val_loss']:.4f} | {ppl} | {c['seeds']} | "
                         f"{c['tok_s'] or 0:,.0f} | {c['tok_s_between_resamples'] or 0:,.0f} | {per} |")
        lines.append("")
    ablations = sorted(k[:-4] for k in flat if k.startswith("ablation_") and k.endswith("_ppl"))
    base = cells.get("austen", {}).get(("rosa", 16))
    if ablations and base:
        defaults = ", ".join(f"{k}={v}" for k, v in quality.ROSA_DEFAULTS.items())
        lines += ["## Ablations (Austen, ROSA r=16, one seed each)", "",
                  f"Each row changes one thing from the defaults ({defaults}) at lr {base['lr']:g}. The "
                  f"defaults' spread over {base['seeds']} seeds (std {base['ppl_std']:.2f}) is the noise level.", "",
                  "Seconds per resample are those of a run sharing the machine with 5-7 others, decomposing on "
                  "the shared GPU or on 2 CPU threads of its own (`factorize_device`).", "",
                  "| change | test PPL | vs defaults | val loss | s per resample | decomposed on |",
                  "|---|---|---|---|---|---|",
                  f"| none (defaults, {base['seeds']} seeds) | {base['ppl']:.2f} ± {base['ppl_std']:.2f} | - | "
                  f"{base['val_loss']:.4f} | {base['resample_s'] / max(1, base['resamples']):.1f} | "
                  f"{WHERE[base['factorize_device']]} |"]
        for k in sorted(ablations, key=lambda k: flat[k + "_ppl"]):
            per = flat[k + "_resample_s"]
            lines.append(f"| {k[9:]} | {flat[k + '_ppl']:.2f} | {flat[k + '_ppl'] - base['ppl']:+.2f} | "
                         f"{flat[k + '_val_loss']:.4f} | {f'{per:.1f}' if per else '-'} | "
                         f"{WHERE[flat[k + '_factorize_device']] if per else '-'} |")
        lines.append("")
    for (corpus, method, rank), _ in quality.PROBES[:1]:
        cell = cells.get(corpus, {}).get((method, rank))
        prefix = f"probe_{corpus}_{_key(method, rank)}_"
        probes = sorted(k[:-4] for k in flat if k.startswith(prefix) and k.endswith("_ppl"))
        if not (cell and probes):
            continue
        lines += [f"## Probes ({corpus}, {NAMES[method]} r={rank}, one seed each)", "",
                  f"Each row changes one thing from the defaults at lr {cell['lr']:g}.", "",
                  "| change | test PPL | vs defaults | val loss |", "|---|---|---|---|",
                  f"| none (defaults, {cell['seeds']} seed) | {cell['ppl']:.2f} | - | {cell['val_loss']:.4f} |"]
        for k in sorted(probes, key=lambda k: flat[k + "_ppl"]):
            lines.append(f"| {k[len(prefix):]} | {flat[k + '_ppl']:.2f} | {flat[k + '_ppl'] - cell['ppl']:+.2f} | "
                         f"{flat[k + '_val_loss']:.4f} |")
        lines.append("")
    if missing:
        lines += [f"## Owed: {len(missing)} planned runs have no result yet", "",
                  ", ".join(f"`{m}`" for m in missing), ""]
    return "\n".join(lines)


def plot(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4.5))
    for ax, (corpus, rows) in zip(axes, cells.items()):
        for (method, rank), c in rows.items():
            steps, losses = zip(*c["curve"][1:])  # step 0 is the untrained model, far above the rest
            color = {None: "black", 4: "tab:blue", 16: "tab:orange", 64: "tab:green"}.get(rank, "tab:gray")
            ax.plot(steps, losses, "--" if method == "lora" else "-", color=color, label=NAMES[method] + (f" r={rank}" if rank else "") + f" (lr {c['lr']:g})")
        ax.set_title(f"{corpus}: validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("next-token loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def perf_summary(results: dict) -> dict:
    """Issue #17's quality check: ROSA r=16 on Austen at its sweep's rate with each cheaper resample
    (``quality.PERF_CHECKS``) against the default, test perplexity per seed; ``_gap_in_std`` is the
    difference of the means in units of the default's seed standard deviation."""
    lr = quality.best_lr(results, *ABLATED)
    rows = {"default": None, **{"_".join(f"{k}={v}" for k, v in a.items()): a for a, _ in quality.PERF_CHECKS}}
    flat = {"lr": lr}
    for name, ablation in rows.items():
        ppl = [r["test_ppl"] for r in sorted(results.values(), key=lambda r: r["spec"]["seed"])
               if (r["spec"]["corpus"], r["spec"]["method"], r["spec"]["rank"]) == ABLATED
               and r["spec"]["lr"] == lr and r["spec"].get("ablation") == ablation]
        if len(ppl) < 2:
            continue
        flat.update({f"ppl_{name}": statistics.mean(ppl), f"ppl_{name}_std": statistics.stdev(ppl),
                     f"ppl_{name}_seeds": ppl})
    if "ppl_default" in flat:
        for name in [n for n in rows if n != "default" and f"ppl_{n}" in flat]:
            flat[f"ppl_{name}_gap_in_std"] = (flat[f"ppl_{name}"] - flat["ppl_default"]) / flat["ppl_default_std"]
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders of per-run JSON files from bench/quality.py")
    parser.add_argument("--out", required=True, help="output path prefix, e.g. bench/results/quality-2026-11-29")
    parser.add_argument("--quantized", action="store_true",
                        help="issue #16's rows only: <out>.json with their flat keys, the table on stdout")
    parser.add_argument("--perf", action="store_true",
                        help="issue #17's resample options against the default: <out>.json, the rows on stdout")
    args = parser.parse_args()
    results = {k: v for runs in args.runs for k, v in quality.load_results(Path(runs)).items()}
    if not results:
        raise SystemExit(f"quality_report: no run results in {' '.join(args.runs)}")
    if args.perf:
        flat = perf_summary(results)
        if "ppl_default" not in flat:
            raise SystemExit(f"quality_report: no seeds of the default ROSA r=16 Austen run in {' '.join(args.runs)}")
        Path(args.out).with_suffix(".json").write_text(json.dumps(flat, indent=1) + "\n")
        for key in (k for k in flat if k.startswith("ppl_") and k.count("_") >= 1 and not k.endswith(("_std", "_seeds"))):
            print(f"{key}: {flat[key]:.3f}")
        return
    if args.quantized:
        flat = quantized_summary(results)
        if "ppl_rosa_nf4_r16" not in flat:
            raise SystemExit(f"quality_report: no ROSA-NF4 runs in {' '.join(args.runs)}")
        nf4_run = next(r for r in results.values() if r["spec"]["method"] == "rosa-nf4")
        flat.update({f"setup_{k}": nf4_run[k] for k in ("steps", "batch", "seq", "tokens")})
        flat["runs_folders"] = args.runs
        Path(args.out).with_suffix(".json").write_text(json.dumps(flat, indent=1) + "\n")
        print(quantized_markdown(flat))
        return
    any_run = next(iter(results.values()))
    setup = {k: any_run[k] for k in ("steps", "batch", "seq", "tokens")}
    flat, cells = summarize(results)
    missing = owed(results)
    flat.update({f"setup_{k}": v for k, v in setup.items()})
    flat["runs_done"] = len(results)
    flat["runs_owed"] = len(missing)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({**flat, "owed": missing}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(flat, cells, missing, setup))
    plot(cells, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
