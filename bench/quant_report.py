"""Summarize quant_bench runs into one flat-key JSON and a plot (issue #16's performance keys).

    python3 bench/quant_report.py --q70b R/quant-70b-DATE.json --q8b R/quant-8b-chunked-DATE.json \
        [--q8b-repeat R/...layerwise.json] [--q8b-full R/quant-8b-DATE.json] \
        --survival R/quant-survival-DATE-h200-4096x4096.json --out R/quantized-DATE.json --plot R/quantized-DATE.png

Why a separate step: the 70B and 8B runs are separate bench calls (their own processes and peaks),
and the survival numbers come from another bench; the issue asks for one file with flat keys.
Keys already in ``--out`` that this script does not write (e.g. quality ``ppl_*`` keys added by
another study) are kept: the file is updated, never replaced. Every number is read from the inputs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# quant_bench's key suffix per mode -> label in the plot
MODES_8B = {"nf4_rosa": "ROSA NF4", "nf4_qlora": "PEFT QLoRA NF4", "nf4_rosa_adamw8bit": "ROSA NF4 AdamW8bit",
            "bf16_rosa": "ROSA bf16 base"}
TARGET_8B_PEAK_GIB = 10.0
TARGET_8B_SPEED_RATIO = 0.9


def load(path: str | None) -> dict:
    return json.loads(Path(path).read_text()) if path else {}


def errors(run: dict) -> dict:
    return {k: v for k, v in run.items() if k.startswith("error_")}


def summary_70b(run: dict) -> dict:
    """The 70B keys. ``peak_gib_70b_nf4_1gpu`` is the highest of the whole run (build, steps,
    resample): whether it fits one GPU is the question."""
    s = "70b_nf4_rosa"
    peaks = [run.get(f"{k}_{s}") for k in ("setup_peak_gib", "peak_gib_with_warmup", "resample_peak_gib")]
    out = {
        "peak_gib_70b_nf4_1gpu": max(p for p in peaks if p is not None),
        "step_peak_gib_70b_nf4_1gpu": run[f"peak_gib_with_warmup_{s}"],
        "model_gib_70b_nf4_1gpu": run[f"model_gib_{s}"],
        "layer_gib_bf16_70b_nf4_1gpu": run[f"layer_gib_bf16_{s}"],
        "tok_s_70b_nf4_1gpu": run[f"tok_s_{s}"],
        "step_s_70b_nf4_1gpu": run[f"step_s_{s}"],
        "setup_s_70b_nf4_1gpu": run[f"setup_s_{s}"],
        "trainable_params_70b_nf4_1gpu": run[f"trainable_params_{s}"],
        "batch_70b": run["batch"], "seq_70b": run["seq"],
        "resample_s_70b_nf4_1gpu": run.get(f"resample_s_{s}"),
        "resample_method_70b_nf4_1gpu": run.get(f"resample_method_{s}"),
        "resample_matrices_70b_nf4_1gpu": run.get(f"resample_matrices_{s}"),
        "resample_peak_gib_70b_nf4_1gpu": run.get(f"resample_peak_gib_{s}"),
        "loss_model_check_70b": run.get(f"loss_model_check_{s}"),
        "loss_chunked_check_70b": run.get(f"loss_chunked_check_{s}"),
    }
    for key, value in run.items():  # the estimate (from one timed split per shape), marked as such
        if key.startswith("resample_est_s_") and key.endswith(s):
            out[key.replace(s, "70b_nf4_1gpu")] = value
    return out


def summary_8b(run: dict, tag: str = "") -> dict:
    """Per mode: tok/s, step, peak of the training steps and of the set-up; ROSA over QLoRA speed."""
    out = {}
    for suffix in MODES_8B:
        s = f"8b_{suffix}"
        if f"tok_s_{s}" not in run:
            continue
        for key in ("tok_s", "step_s", "peak_gib", "setup_peak_gib"):
            out[f"{key}_{s}{tag}"] = run[f"{key}_{s}"]
        out[f"loss_model_check_{s}{tag}"] = run.get(f"loss_model_check_{s}")
        out[f"loss_chunked_check_{s}{tag}"] = run.get(f"loss_chunked_check_{s}")
    rosa, qlora = out.get(f"tok_s_8b_nf4_rosa{tag}"), out.get(f"tok_s_8b_nf4_qlora{tag}")
    if rosa and qlora:
        out[f"rosa_over_qlora_tok_s_8b{tag}"] = rosa / qlora
    out[f"loss_8b{tag}"] = run.get("loss")
    out[f"build_8b{tag}"] = run.get("build")
    return out


def summary_survival(run: dict, source: str) -> dict:
    """One resample's survival of a 1e-2 update re-quantized in place (what a stack-less design keeps),
    beside the stack's, from quant_survival's JSON."""
    return {"survival_nf4": run["survival_nf4"], "survival_int8": run["survival_int8"],
            "survival_stack_bf16_nf4": run.get("survival_stack_bf16_nf4_1e-2"),
            "survival_shape": run["shape"] if isinstance(run["shape"], str) else "x".join(map(str, run["shape"])),
            "survival_update_size": 1e-2, "survival_source": Path(source).name}


def targets(flat: dict, run70: dict) -> dict:
    """Issue #16's targets, judged from the keys (None where a number is missing)."""
    peak, ratio = flat.get("peak_gib_8b_nf4_rosa"), flat.get("rosa_over_qlora_tok_s_8b")
    return {
        "target_8b_peak_le_10gib_met": None if peak is None else peak <= TARGET_8B_PEAK_GIB,
        "target_8b_speed_ge_0p9_qlora_met": None if ratio is None else ratio >= TARGET_8B_SPEED_RATIO,
        "target_70b_one_gpu_trains_and_resamples_met": bool(run70) and not errors(run70)
        and flat.get("tok_s_70b_nf4_1gpu") is not None and flat.get("resample_s_70b_nf4_1gpu") is not None,
    }


def plot(flat: dict, full: dict, path: str) -> None:
    """Peak GiB and tokens/s per mode: the 8B modes with the chunked loss (and the model's own loss
    where ``full`` has them), the 70B run on its own bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in MODES_8B if f"tok_s_8b_{s}" in flat]
    labels = [MODES_8B[s] + "\n8B, B=2" for s in names] + ["ROSA NF4\n70B, B=1"]
    peaks = [flat[f"peak_gib_8b_{s}"] for s in names] + [flat["peak_gib_70b_nf4_1gpu"]]
    toks = [flat[f"tok_s_8b_{s}"] for s in names] + [flat["tok_s_70b_nf4_1gpu"]]
    full_peaks = [full.get(f"peak_gib_8b_{s}") for s in names] + [None]
    full_toks = [full.get(f"tok_s_8b_{s}") for s in names] + [None]
    x = range(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, chunked, own, title in ((axes[0], peaks, full_peaks, "peak GiB of a training step"),
                                    (axes[1], toks, full_toks, "tokens / s")):
        if any(v is not None for v in own):
            ax.bar([i - 0.2 for i in x], [v or 0 for v in own], 0.4, label="model's own loss, full logits (--q8b-full)",
                   color="#bbbbbb")
            ax.bar([i + 0.2 for i in x], chunked, 0.4, label="chunked loss", color="#3b75af")
        else:
            ax.bar(list(x), chunked, 0.6, label="chunked loss", color="#3b75af")
        for i, v in enumerate(chunked):
            ax.annotate(f"{v:,.1f}" if v < 100 else f"{v:,.0f}", (i + (0.2 if any(own) else 0), v),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].axhline(TARGET_8B_PEAK_GIB, color="#c0392b", ls="--", lw=1)
    axes[0].annotate("8B target 10 GiB", (0, TARGET_8B_PEAK_GIB), color="#c0392b", fontsize=8, va="bottom")
    fig.suptitle(f"ROSA over a frozen NF4 base, one {flat.get('device_name', 'GPU')}, S=2048, r=16, "
                 "activation checkpointing")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--q70b", required=True, help="quant_bench --shape 70b JSON")
    p.add_argument("--q8b", required=True, help="quant_bench 8B JSON with --chunked-loss (the main 8B keys)")
    p.add_argument("--q8b-repeat", help="a second 8B call (keys get the suffix _repeat)")
    p.add_argument("--q8b-full", help="an 8B run with the model's own loss (plotted beside, keys *_full_loss)")
    p.add_argument("--survival", required=True, help="quant_survival JSON to copy survival_nf4/int8 from")
    p.add_argument("--out", required=True)
    p.add_argument("--plot")
    args = p.parse_args(argv)
    run70, run8, repeat, full = load(args.q70b), load(args.q8b), load(args.q8b_repeat), load(args.q8b_full)
    flat = load(args.out) if Path(args.out).exists() else {}
    flat.update({k: run70.get(k) for k in ("date", "device_name", "torch", "transformers", "peft", "bitsandbytes",
                                           "rank", "rosa_method", "quant", "gradient_checkpointing")})
    flat.update(summary_70b(run70))
    flat.update(summary_8b(run8))
    if repeat:
        flat.update(summary_8b(repeat, "_repeat"))
    if full:
        flat.update({k + "_full_loss": v for k, v in summary_8b(full).items()
                     if k.startswith(("tok_s_", "peak_gib_", "rosa_over_"))})
    flat.update(summary_survival(load(args.survival), args.survival))
    flat.update(targets(flat, run70))
    flat["sources"] = [Path(f).name for f in (args.q70b, args.q8b, args.q8b_repeat, args.q8b_full) if f]
    flat["errors"] = {**errors(run70), **errors(run8), **errors(repeat)}
    Path(args.out).write_text(json.dumps(flat, indent=2) + "\n")
    if args.plot:
        plot(flat, full, args.plot)
    print(json.dumps({k: v for k, v in flat.items() if k.startswith(("target_", "peak_gib_", "tok_s_", "resample_s"))},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
