"""Issue #17's flat keys, a markdown table and two plots from fsdp2_bench runs of one session.

    python3 bench/perf_report.py --prefix bench/results/perf-2026-11-30

reads ``<prefix>-{1gpu,2gpu}-compiled.json`` (frozen, ROSA and PEFT LoRA, each decoder layer compiled),
``<prefix>-{1gpu,2gpu}-peft-eager.json`` (PEFT LoRA as its users run it), ``<prefix>-2gpu-rosa-ckpt.json``
(checkpointing + chunked loss), ``<prefix>-2gpu-run-stagger.json`` (a run with the resample schedule;
``-2gpu-run-gc.json``, the same with collections at fixed steps, wins when present), ``<prefix>-70b-2gpu.json``,
``<prefix>-2gpu-docs{1,8}.json`` (packed documents), ``<prefix>-8b-loading.json`` and variants of the step
(``VARIANTS``: checkpointing, a larger batch, AdamW's implementation, mode order, ``-1gpu-gc`` (collections at
fixed steps), ``-1gpu-local[-ckpt]`` with the ``*_local`` modes: rosa-train's one-process path); ``rosa`` is the step
rosa-train takes by default, ``rosa_unfused``, ``rosa_gemms`` (the backward without thin_grads' kernels),
``rosa_ungrouped`` (``shared_inputs: []``) and
``rosa_sharded`` the same with one default changed; writes ``<prefix>.json`` and ``<prefix>-{speed,steps}.png``.
Every number is read from those files; the ratios pair runs of one machine and call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # rosa_scale without an install
from rosa_scale.builtin._cache import atomic_open  # noqa: E402

TARGETS = {"rosa_over_frozen": 0.93, "rosa_over_peft": 1.3, "rosa_over_peft_compiled": 1.1,
           "resample_overhead_frac_2gpu": 0.03, "max_step_over_median_2gpu": 2.0, "peak_gib_8b_ckpt_2gpu": 14.0}


# Optional runs of other step settings: each gives frozen/ROSA/PEFT ratios and fused/separate ROSA layers
# (mode rosa_unfused), keyed by the run's name.
# -local: rosa-train's one-process path (modes *_local), no fsdp.
VARIANTS = ("1gpu-ckpt", "1gpu-ckpt-peft", "1gpu-b4", "1gpu-adamw-fused", "1gpu-adamw-foreach", "1gpu-order", "1gpu-gc",
            "1gpu-local", "1gpu-local-ckpt", "2gpu-ckpt")
MODES = ("frozen", "rosa", "rosa_unfused", "rosa_gemms", "rosa_ungrouped", "rosa_sharded", "peft_lora")


def local_name(mode: str) -> str:
    """fsdp2_bench's name of ``mode`` on rosa-train's path without fsdp (rosa_ungrouped -> rosa_local_ungrouped)."""
    return mode.replace("rosa", "rosa_local", 1) if mode.startswith("rosa") else f"{mode}_local"


def variant_ratios(name: str, run: dict) -> dict:
    """tokens/s of each mode in ``run`` and the ratios of ROSA to the others in it."""
    local = "rosa_local_tok_s_per_gpu" in run  # frozen_local, rosa_local, rosa_local_ungrouped read as frozen, ...
    keys = {mode: f"{local_name(mode) if local else mode}_tok_s_per_gpu" for mode in MODES}
    tok = {mode: run[key] for mode, key in keys.items() if key in run}
    key = name.replace("-", "_")
    flat = {f"tok_s_{mode}_{key}": value for mode, value in tok.items()}
    for other, label in (("frozen", "frozen"), ("rosa_unfused", "unfused"), ("rosa_gemms", "gemms"),
                         ("rosa_ungrouped", "ungrouped"), ("rosa_sharded", "sharded"), ("peft_lora", "peft_compiled")):
        if "rosa" in tok and other in tok:
            flat[f"rosa_over_{label}_{key}"] = tok["rosa"] / tok[other]
    return flat


def load(prefix: str, name: str) -> dict:
    path = Path(f"{prefix}-{name}.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize(prefix: str) -> dict:
    flat = {}
    for gpus in (1, 2):
        fast, eager = load(prefix, f"{gpus}gpu-compiled"), load(prefix, f"{gpus}gpu-peft-eager")
        if not fast:
            continue
        rosa = fast["rosa_tok_s_per_gpu"]
        flat.update({f"tok_s_frozen_compiled_{gpus}gpu": fast["frozen_tok_s_per_gpu"],
                     f"tok_s_rosa_compiled_{gpus}gpu": rosa,
                     f"tok_s_peft_compiled_{gpus}gpu": fast["peft_lora_tok_s_per_gpu"],
                     f"rosa_over_frozen_{gpus}gpu": rosa / fast["frozen_tok_s_per_gpu"],
                     f"rosa_over_peft_compiled_{gpus}gpu": rosa / fast["peft_lora_tok_s_per_gpu"],
                     f"peak_gib_rosa_compiled_{gpus}gpu": fast["rosa_peak_gib"]})
        # the same ROSA with one default changed: base and factors as separate operations, factors sharded
        for mode, label in (("rosa_unfused", "unfused"), ("rosa_gemms", "gemms"), ("rosa_ungrouped", "ungrouped"),
                            ("rosa_sharded", "sharded")):
            if f"{mode}_tok_s_per_gpu" in fast:
                flat[f"tok_s_{mode}_compiled_{gpus}gpu"] = fast[f"{mode}_tok_s_per_gpu"]
                flat[f"rosa_over_{label}_{gpus}gpu"] = rosa / fast[f"{mode}_tok_s_per_gpu"]
        if eager:
            flat[f"tok_s_peft_eager_{gpus}gpu"] = eager["peft_lora_tok_s_per_gpu"]
            flat[f"rosa_over_peft_{gpus}gpu"] = rosa / eager["peft_lora_tok_s_per_gpu"]
        for method in ("eigh", "qr"):
            if f"resample_s_{method}" in fast:
                flat[f"resample_s_{method}_{gpus}gpu"] = fast[f"resample_s_{method}"]
        if gpus == 2 and "resample_s_eigh" in fast:  # one resample at once every 200 steps (the former default)
            flat["resample_overhead_frac_2gpu_eigh_at_once"] = fast["resample_s_eigh"] / (200 * fast["rosa_step_s"])
            flat["max_step_over_median_2gpu_eigh_at_once"] = 1 + fast["resample_s_eigh"] / fast["rosa_step_s"]
    uncontrolled = load(prefix, "2gpu-run-stagger")
    run = load(prefix, "2gpu-run-gc") or uncontrolled
    if run is not uncontrolled and uncontrolled:
        flat["max_step_over_median_2gpu_python_gc"] = uncontrolled["run_max_step_over_median"]
    if run:
        times, median, marked = run["run_step_s_each"], run["run_median_step_s"], run["run_resample_steps"]
        flat.update({"resample_overhead_frac_2gpu": run["run_resample_overhead_frac"],
                     "max_step_over_median_2gpu": run["run_max_step_over_median"],
                     "max_resample_step_over_median_2gpu": max(times[s - 1] for s in marked) / median,
                     "run_schedule_2gpu": f"every {run['run_resample_every']} steps, {run['run_method']}, spread over "
                                          f"{run['run_stagger']} steps, {len(times)} steps"
                                          + (f", collections every {run['run_gc_every']}" if run.get("run_gc_every") else "")})
    docs1, docs8 = load(prefix, "2gpu-docs1"), load(prefix, "2gpu-docs8")
    if docs1 and docs8:  # sdpa's masked kernel (position ids restart in each sequence) against the causal one
        flat["packed_docs8_over_docs1_2gpu"] = docs8["rosa_tok_s_per_gpu"] / docs1["rosa_tok_s_per_gpu"]
    loading = load(prefix, "8b-loading")
    if loading:
        own, plugin = loading["launch_local_sh_fsdp_true_streamed"], loading["accelerate_fsdp2_plugin_whole_then_sharded"]
        flat.update(host_rss_anon_gib_8b_folder_per_rank=own["rss_anon_mib"] / 1024,
                    host_rss_file_gib_8b_folder_per_rank=own["rss_file_mib"] / 1024,
                    gpu_used_gib_8b_folder_streamed=own["gpu_used_mib"] / 1024,
                    gpu_used_gib_8b_folder_accelerate_plugin=plugin["gpu_used_mib"] / 1024,
                    tok_s_8b_folder_streamed_over_accelerate_plugin=own["tok_s_per_gpu"] / plugin["tok_s_per_gpu"])
    for name in VARIANTS:
        run = load(prefix, name)
        if run:
            flat.update(variant_ratios(name, run))
    ckpt = load(prefix, "2gpu-rosa-ckpt")
    if ckpt:
        flat.update(peak_gib_8b_ckpt_2gpu=ckpt["rosa_peak_gib"], tok_s_8b_ckpt_2gpu=ckpt["rosa_tok_s_per_gpu"])
    big = load(prefix, "70b-2gpu")
    if big:
        flat.update(llama70b_peak_gib_per_gpu=big["rosa_peak_gib"], llama70b_tok_s_per_gpu=big["rosa_tok_s_per_gpu"],
                    llama70b_resample_s=big["rosa_first_split_s_eigh"], llama70b_resample_s_qr=big.get("resample_s_qr"),
                    llama70b_host_rss_gib_per_rank=big["host_rss_gib_after_split"])
    for key, target in TARGETS.items():
        for name in [k for k in flat if k == key or (k.startswith(key + "_") and k[len(key) + 1:] in ("1gpu", "2gpu"))]:
            low_is_good = key.startswith(("resample", "max_step", "peak"))
            flat[f"target_met_{name}"] = flat[name] <= target if low_is_good else flat[name] >= target
    return flat


def plot(prefix: str, flat: dict) -> None:
    try:
        import matplotlib
    except ImportError:  # the keys are written already; the pictures need the bench extra
        print("perf_report: plots skipped: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("frozen base, compiled", "frozen_compiled"), ("ROSA, compiled (rosa-train default)", "rosa_compiled"),
            ("ROSA, base and factors apart (fused: false)", "rosa_unfused_compiled"),
            ("ROSA, backward in cuBLAS only (no Triton kernels)", "rosa_gemms_compiled"),
            ("ROSA, factors sharded (fsdp_factors: sharded)", "rosa_sharded_compiled"),
            ("PEFT LoRA, compiled", "peft_compiled"), ("PEFT LoRA, its defaults", "peft_eager")]
    rows = [(label, key) for label, key in rows if any(f"tok_s_{key}_{g}gpu" in flat for g in (1, 2))]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (label, key) in enumerate(rows):
        values = [flat.get(f"tok_s_{key}_{g}gpu", 0) for g in (1, 2)]
        width = 0.8 / len(rows)
        ax.bar([g + (i - (len(rows) - 1) / 2) * width for g in (0, 1)], values, width, label=label)
    ax.set_xticks([0, 1], ["1 H200", "2 H200 (FSDP2)"])
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title("Llama-3-8B shape, B=2, S=2048, r=16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{prefix}-speed.png", dpi=120)
    run = load(prefix, "2gpu-run-gc") or load(prefix, "2gpu-run-stagger")
    if run:
        fig, ax = plt.subplots(figsize=(7, 3))
        times = [t * 1e3 for t in run["run_step_s_each"]]
        ax.plot(range(1, len(times) + 1), times, lw=0.8, label="step")
        ax.scatter(run["run_resample_steps"], [times[s - 1] for s in run["run_resample_steps"]], s=10, color="red",
                   label=f"step with 1/{run['run_stagger']} of a resample ({run['run_method']})")
        ax.axhline(2e3 * run["run_median_step_s"], color="gray", ls=":", label="2x median")
        ax.set_xlabel("step")
        ax.set_ylabel("ms")
        ax.set_title("ROSA on 2 H200s, resample every 200 steps spread over 8")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{prefix}-steps.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True, help="e.g. bench/results/perf-2026-11-30")
    args = parser.parse_args()
    flat = summarize(args.prefix)
    if not flat:
        raise SystemExit(f"perf_report: no fsdp2_bench results at {args.prefix}-*.json")
    with atomic_open(f"{args.prefix}.json") as f:  # a kill leaves the last whole file, never half of one
        f.write(json.dumps(flat, indent=1) + "\n")
    plot(args.prefix, flat)
    print(json.dumps(flat, indent=1))


if __name__ == "__main__":
    main()
