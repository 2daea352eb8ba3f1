"""The quality study's driver on a tiny Llama: every method trains, is scored, and resumes by file."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    tiny_llama(vocab_size=300).save_pretrained(tmp / "model")
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 300, (64,), generator=g, dtype=torch.int32)

    def stream(n):  # learnable: a repeated pattern with some noise
        s = pattern.repeat(n // 64 + 1)[:n].clone()
        noise = torch.rand(n, generator=g) < 0.1
        s[noise] = torch.randint(0, 300, (int(noise.sum()),), generator=g, dtype=torch.int32)
        return s

    splits = {"train": stream(4096), "validation": stream(512), "test": stream(512)}
    torch.save({"austen": splits, "stdlib": splits}, tmp / "data.pt")
    return tmp


def _train(setup, spec, steps=12):
    return quality.train_one(spec, str(setup / "data.pt"), str(setup / "model"), str(setup), steps=steps,
                             batch=4, seq=32, eval_every=6, warmup=2)


@pytest.mark.parametrize("method,rank,lr", [("full", None, 1e-3), ("lora", 4, 1e-2), ("rosa", 4, 1e-2)])
def test_every_method_trains_and_is_scored(setup, method, rank, lr):
    spec = {"corpus": "austen", "method": method, "rank": rank, "lr": lr, "seed": 0,
            "ablation": {"resample_every": 5}}
    r = _train(setup, spec)
    assert r["finite"] and [s for s, _ in r["curve"]] == [0, 6, 12]
    assert r["curve"][-1][1] < r["curve"][0][1] - 0.1  # it learned the pattern
    assert math.isclose(r["test_ppl"], math.exp(r["test_loss"]))
    assert r["tokens"] == 12 * 4 * 32
    saved = json.loads((setup / f"{quality.run_id(spec)}.json").read_text())
    assert saved["val_loss"] == r["val_loss"]
    if method == "rosa":
        assert r["resamples"] == 2  # steps 5 and 10
        assert r["trainable_params"] == sum(4 * (o + i) for o, i in _shapes())
        assert [s["step"] for s in r["survival"]] == [5, 10]  # fp32 w_fixed: every merged update kept
        assert all(abs(s["survival"] - 1) < 1e-4 and s["update_rel"] > 0 for s in r["survival"])
    if method == "lora":
        assert r["trainable_params"] == sum(4 * (o + i) for o, i in _shapes())  # same budget as ROSA


def test_methods_over_an_nf4_base_train_from_one_quantized_model(setup):
    pytest.importorskip("bitsandbytes")
    runs = {}
    for method in ("rosa-nf4", "qlora"):
        spec = {"corpus": "austen", "method": method, "rank": 4, "lr": 1e-2, "seed": 0,
                "ablation": {"resample_every": 3}}
        runs[method] = r = _train(setup, spec, steps=6)
        assert r["finite"] and r["curve"][-1][1] < r["curve"][0][1] - 0.1
        assert r["trainable_params"] == sum(4 * (o + i) for o, i in _shapes())  # the budget of lora and rosa
        assert r["nf4_layers"] == len(_shapes()) and r["nf4_quant_types"] == ["nf4"]
        assert r["nf4_compute_dtypes"] == ["bfloat16"]  # multiplies in bf16, as autocast does unquantized
    # One quantized base for both: the same first loss, but for one CPU artifact. bitsandbytes' CPU kernel
    # misreads the codes of a weight 96 wide (rosa_scale.quant.dequantize_4bit); ROSA's layer reads them
    # right, PEFT's goes through that kernel, so on the CPU the first losses differ by ~1% (equal on CUDA).
    first = runs["rosa-nf4"]["curve"][0][1], runs["qlora"]["curve"][0][1]
    assert abs(first[0] - first[1]) < 0.02 * first[0]
    assert runs["qlora"]["resamples"] == 0 and "survival" not in runs["qlora"]
    # ROSA's stack keeps every merged update (bf16 rounding only): in-place NF4 would keep ~1-30%
    assert runs["rosa-nf4"]["resamples"] == 1 and abs(runs["rosa-nf4"]["survival"][0]["survival"] - 1) < 1e-3


def test_quantized_phase_reuses_the_counterparts_rate_and_adds_bf16_seeds():
    def result(method, rank, lr, val, ablation=None):
        spec = {"corpus": "austen", "method": method, "rank": rank, "lr": lr, "seed": 0}
        spec.update({"ablation": ablation} if ablation else {})
        return quality.run_id(spec), {"spec": spec, "val_loss": val, "finite": True}

    results = dict([result("rosa", 16, 3e-4, 3.2), result("rosa", 16, 1e-3, 3.1), result("rosa", 16, 3e-3, 3.3),
                    result("lora", 16, 3e-4, 3.3), result("lora", 16, 1e-3, 3.2)])
    ids = {quality.run_id(s) for s in quality.plan("quantized", results)}
    fits = {f"austen_rosa-nf4-r16_lr0.001_s{s}_quant_error_rank={k}" for k in (16, 64) for s in range(3)}
    assert ids == {"austen_rosa-nf4-r16_lr0.001_s0", "austen_rosa-nf4-r16_lr0.001_s1", "austen_rosa-nf4-r16_lr0.001_s2",
                   "austen_rosa-r16_lr0.001_s1_model_dtype=bfloat16", "austen_rosa-r16_lr0.001_s2_model_dtype=bfloat16",
                   *fits}
    results.update([result("lora", 16, 3e-3, 3.25), result("rosa-nf4", 16, 1e-2, 1.0)])  # lora settled at 1e-3
    ids = {quality.run_id(s) for s in quality.plan("quantized", results)}
    assert {"austen_qlora-r16_lr0.001_s0", "austen_qlora-r16_lr0.001_s2"} <= ids and len(ids) == 8 + len(fits)
    assert quality.best_lr(results, "austen", "rosa", 16) == 1e-3  # an nf4 run never changes rosa's rate
    assert not any("nf4" in quality.run_id(s) or "qlora" in quality.run_id(s) for s in quality.plan("all", results))


def _shapes():
    model = tiny_llama(vocab_size=300)
    return [(m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def test_best_lr_uses_validation_and_final_phase_follows_it():
    def result(lr, val, test):
        spec = {"corpus": "austen", "method": "rosa", "rank": 16, "lr": lr, "seed": 0}
        return quality.run_id(spec), {"spec": spec, "val_loss": val, "test_loss": test, "finite": True}

    results = dict([result(1e-3, 2.0, 9.0), result(3e-3, 1.5, 9.5), result(3e-4, 2.5, 1.0)])
    assert quality.best_lr(results, "austen", "rosa", 16) == 3e-3  # validation decides, never test
    finals = quality.final_specs(results)
    assert {s["lr"] for s in finals} == {3e-3}
    assert len([s for s in finals if "ablation" in s]) == len(quality.ABLATIONS)


def test_driver_skips_finished_runs(setup, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "sweep", "--data", str(setup / "data.pt"),
           "--model", str(setup / "model"), "--runs", str(runs), "--steps", "2", "--batch", "2", "--seq", "16",
           "--eval-every", "2", "--warmup", "0", "--workers", "1", "--only", "austen_base"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "1 runs to do" in first.stdout and (runs / "austen_base_lr0_s0.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "0 runs to do now (1 done)" in again.stdout
    cmd[cmd.index("sweep")] = "all"  # the same plan through the phase that mixes sweep and final runs
    mixed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert mixed.returncode == 0 and "0 runs to do now (1 done)" in mixed.stdout, mixed.stderr[-2000:]


def test_report_picks_validation_best_averages_seeds_and_lists_owed(tmp_path):
    import quality_report

    def result(method, rank, lr, seed, val, ppl):
        spec = {"corpus": "austen", "method": method, "rank": rank, "lr": lr, "seed": seed}
        return quality.run_id(spec), {"spec": spec, "val_loss": val, "test_ppl": ppl, "finite": True,
                                      "trainable_params": 10, "curve": [(0, 4.0), (5, val)], "resample_s": 2.0,
                                      "resamples": 2, "tokens": 100, "train_s": 3.0, "tok_s": 33.3, "peak_gib": 1.0}

    results = dict([result("rosa", 16, 1e-3, 0, 3.0, 20.0), result("rosa", 16, 1e-3, 1, 3.1, 22.0),
                    result("rosa", 16, 3e-3, 0, 3.5, 10.0), result("lora", 16, 1e-3, 0, 3.2, 21.0)])
    flat, cells = quality_report.summarize(results)
    assert flat["lr_rosa_r16"] == 1e-3 and flat["ppl_rosa_r16"] == 21.0  # mean of two seeds at the val-best lr
    assert flat["ppl_rosa_r16_seeds"] == 2 and abs(flat["ppl_rosa_r16_std"] - 2 ** 0.5) < 1e-9
    assert flat["lr_rosa_r16_bracketed"] is False  # 3e-4 never ran
    assert flat["tok_s_between_resamples_rosa_r16"] == 100.0
    missing = quality_report.owed(results)
    assert "austen_rosa-r16_lr0.0003_s0" in missing and "austen_rosa-r16_lr0.001_s1" not in missing
    assert "austen_rosa-r16_lr0.001_s2" in missing  # a headline seed still owed
    text = quality_report.markdown(flat, cells, missing, {"steps": 5, "batch": 2, "seq": 10, "tokens": 100})
    assert "| ROSA r=16 | 0.00M | 0.001 (edge of sweep) |" in text and "21.00 ± 1.41" in text


def test_missing_inputs_give_one_line_and_write_nothing(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "sweep", "--data", str(tmp_path / "none.pt"),
           "--model", str(tmp_path), "--runs", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [f"quality.py: error: --data: {tmp_path / 'none.pt'} not found"]
    assert not (tmp_path / "runs").exists()


def test_sweep_extends_past_an_edge_until_the_best_rate_is_bracketed():
    def result(lr, val):
        spec = {"corpus": "stdlib", "method": "lora", "rank": 64, "lr": lr, "seed": 0}
        return quality.run_id(spec), {"spec": spec, "val_loss": val, "finite": True}

    def planned(results):
        return sorted(s["lr"] for s in quality.sweep_specs(results)
                      if s["corpus"] == "stdlib" and s["method"] == "lora" and s["rank"] == 64)

    assert planned({}) == [3e-4, 1e-3, 3e-3]
    results = dict([result(3e-4, 2.0), result(1e-3, 2.5)])
    assert planned(results) == [3e-4, 1e-3, 3e-3]  # the grid is not finished: no extension yet
    results.update([result(3e-3, 2.9)])
    assert planned(results) == [1e-4, 3e-4, 1e-3, 3e-3]  # best at the low edge: one rung lower
    results.update([result(1e-4, 1.9)])
    assert planned(results) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]  # still at the edge: one more
    results.update([result(3e-5, 2.1)])
    assert planned(results) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]  # bracketed: the sweep is done
    assert quality.best_lr(results, "stdlib", "lora", 64) == 1e-4
    results.update([result(1e-2, float("nan"))])
    results[next(k for k in results if "lr0.01_" in k)]["finite"] = False  # diverged: tried, never best
    del results[quality.run_id({"corpus": "stdlib", "method": "lora", "rank": 64, "lr": 3e-5, "seed": 0})]
    results[next(k for k in results if "lr0.0001" in k)]["val_loss"] = 3.0
    assert planned(results) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]  # 3e-4 best and inside: nothing new


def test_all_phase_releases_a_cells_seeds_once_its_sweep_is_settled():
    def result(corpus, method, rank, lr, val):
        spec = {"corpus": corpus, "method": method, "rank": rank, "lr": lr, "seed": 0}
        return quality.run_id(spec), {"spec": spec, "val_loss": val, "finite": True}

    # austen ROSA r=16: best rate inside its grid (settled); stdlib LoRA r=16: best at the low edge
    results = dict([result("austen", "rosa", 16, 3e-4, 3.2), result("austen", "rosa", 16, 1e-3, 3.1),
                    result("austen", "rosa", 16, 3e-3, 3.3), result("stdlib", "lora", 16, 3e-4, 2.2),
                    result("stdlib", "lora", 16, 1e-3, 2.3), result("stdlib", "lora", 16, 3e-3, 2.6)])
    ids = {quality.run_id(s) for s in quality.plan("all", results)}
    assert "austen_rosa-r16_lr0.001_s1" in ids and "austen_rosa-r16_lr0.001_s0_factorizer=eigh" in ids
    assert "stdlib_lora-r16_lr0.0001_s0" in ids  # the edge rung is planned ...
    assert not any(i.startswith("stdlib_lora-r16") and i.endswith(("_s1", "_s2")) for i in ids)  # ... seeds wait
    assert "stdlib_lora-r16_lr0.0003_s1" in {quality.run_id(s) for s in quality.plan("final", results)}
    results.update([result("stdlib", "lora", 16, 1e-4, 2.25)])  # the rung is worse: 3e-4 is bracketed
    ids = {quality.run_id(s) for s in quality.plan("all", results, only="stdlib_lora-r16")}
    assert ids >= {"stdlib_lora-r16_lr0.0003_s1", "stdlib_lora-r16_lr0.0003_s2"}
    assert all(i.startswith("stdlib_lora-r16") for i in ids)


def test_quantized_report_compares_each_nf4_row_with_its_unquantized_counterpart(tmp_path):
    import quality_report

    def result(method, lr, seed, ppl, ablation=None, survival=None):
        spec = {"corpus": "austen", "method": method, "rank": 16, "lr": lr, "seed": seed}
        spec.update({"ablation": ablation} if ablation else {})
        r = {"id": quality.run_id(spec), "spec": spec, "val_loss": 3.0 if lr == 1e-3 else 3.5, "test_ppl": ppl, "finite": True,
             "trainable_params": 10, "curve": [(0, 3.6)], "peak_gib": 1.0, "tok_s": 5.0,
             "resample_s": 0.0, "resamples": 0, "tokens": 100, "train_s": 1.0}
        if survival is not None:
            r["survival"] = [{"survival": survival, "survival_min": survival - 0.01, "update_rel": 0.02,
                              "jump_rel": 1e-3}]
        return r["id"], r

    results = dict([result("rosa", 3e-4, 0, 26.0), result("rosa", 3e-3, 0, 27.0), result("lora", 3e-4, 0, 26.5),
                    result("lora", 3e-3, 0, 27.5)]  # the sweeps: 1e-3 is each one's best
                   + [result("rosa", 1e-3, s, 25.0 + s / 10) for s in range(3)]
                   + [result("lora", 1e-3, s, 25.7) for s in range(3)]
                   + [result("rosa-nf4", 1e-3, s, 25.1, survival=0.9999) for s in range(3)]
                   + [result("qlora", 1e-3, s, 25.9 + s / 10) for s in range(3)]
                   + [result("rosa", 1e-3, s, 25.2, quality.BF16_STORED, survival=0.99) for s in (1, 2)]
                   + [result("rosa", 1e-3, 0, 25.3, quality.BF16_STORED)])
    (tmp_path / "bench.json").write_text(json.dumps({"survival_stack_bf16_nf4_1e-2": 0.99999}))
    flat = quality_report.quantized_summary(results, bench_dir=tmp_path)
    assert flat["ppl_rosa_nf4_r16"] == pytest.approx(25.1) and flat["ppl_rosa_bf16_r16"] == pytest.approx(25.1)
    assert flat["ppl_rosa_bf16_r16_std"] == pytest.approx(0.1) and flat["ppl_qlora_r16"] == pytest.approx(26.0)
    assert flat["ppl_lora_r16"] == pytest.approx(25.7) and flat["ppl_lora_r16_std"] == 0.0
    assert flat["ppl_rosa_bf16_stored_r16_seeds"] == 3 and flat["survival_rosa_bf16_stored_r16_seeds"] == 2
    assert flat["lr_qlora_r16"] == 1e-3 and flat["survival_rosa_nf4_r16"] == pytest.approx(0.9999)
    assert flat["target_rosa_nf4_beats_qlora"] and flat["target_rosa_nf4_within_bf16_spread"]
    assert "survival_bench_nf4_stack" not in flat  # its file is not in this folder
    text = quality_report.quantized_markdown(flat)
    assert "| ROSA, NF4 base |" in text and "25.10 ± 0.00" in text and "beats PEFT QLoRA: **yes**" in text
    flat_old, _ = quality_report.summarize(results)  # the study's own report: seed 0 of the bf16 ablation only
    assert flat_old["ablation_model_dtype=bfloat16_ppl"] == 25.3


def test_a_resample_spread_over_steps_trains_and_the_perf_phase_plans_its_checks(setup):
    spec = {"corpus": "austen", "method": "rosa", "rank": 4, "lr": 1e-2, "seed": 0,
            "ablation": {"resample_every": 5, "resample_stagger": 2, "factorizer": "qr"}}
    r = _train(setup, spec)
    assert r["finite"] and r["resamples"] == 2 and r["survival"] == []  # parts after steps 5, 6 and 10, 11
    assert r["curve"][-1][1] < r["curve"][0][1] - 0.1
    specs = [({"corpus": "austen", "method": "rosa", "rank": 16, "lr": lr, "seed": 0}, v)
             for lr, v in ((3e-4, 3.2), (1e-3, 3.1), (3e-3, 3.3))]
    results = {quality.run_id(sp): {"spec": sp, "val_loss": v, "finite": True} for sp, v in specs}
    ids = {quality.run_id(s) for s in quality.plan("perf", results)}
    assert ids == {*(f"austen_rosa-r16_lr0.001_s{s}_factorizer=qr_resample_stagger=8" for s in range(3)),
                   "austen_rosa-r16_lr0.001_s1_factorizer=qr", "austen_rosa-r16_lr0.001_s2_factorizer=qr"}


def test_perf_report_compares_each_cheaper_resample_with_the_default_in_its_seed_spread():
    import quality_report

    def result(lr, seed, val, ppl, ablation=None):
        spec = {"corpus": "austen", "method": "rosa", "rank": 16, "lr": lr, "seed": seed}
        spec.update({"ablation": ablation} if ablation else {})
        return quality.run_id(spec), {"spec": spec, "val_loss": val, "test_ppl": ppl, "finite": True}

    qr, spread = {"factorizer": "qr"}, {"factorizer": "qr", "resample_stagger": 8}
    results = dict([result(3e-4, 0, 3.3, 30.0), result(3e-3, 0, 3.2, 31.0)]
                   + [result(1e-3, s, 3.1, 25.0 + s / 10) for s in range(3)]
                   + [result(1e-3, s, 3.1, 25.2 + s / 10, qr) for s in range(3)]
                   + [result(1e-3, s, 3.1, 25.4, spread) for s in range(3)] + [result(3e-3, 1, 3.0, 20.0, qr)])
    flat = quality_report.perf_summary(results)
    assert flat["lr"] == 1e-3 and flat["ppl_default"] == pytest.approx(25.1)
    assert flat["ppl_default_seeds"] == pytest.approx([25.0, 25.1, 25.2])
    assert flat["ppl_factorizer=qr"] == pytest.approx(25.3)  # the run at another rate is not one of its seeds
    assert flat["ppl_factorizer=qr_gap_in_std"] == pytest.approx(2.0)
    assert flat["ppl_factorizer=qr_resample_stagger=8_gap_in_std"] == pytest.approx(3.0)
