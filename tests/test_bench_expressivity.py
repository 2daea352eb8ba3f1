"""Smoke test of bench/expressivity.py at 64x64, rank 2: the keys are there and ROSA goes where LoRA cannot.

LoRA at or above the Eckart-Young floor checks the floor is computed right (no rank-r update beats it);
ROSA below it checks the resampled factors add up to more than rank r, as in tests/test_expressivity.py.
"""
import json
from pathlib import Path

import pytest

from tests.bench_module import load_bench



def _bench():
    return load_bench("expressivity")


@pytest.mark.parametrize("plot", [False, True])
def test_expressivity_bench_small(tmp_path, plot):
    if plot:
        pytest.importorskip("matplotlib")
    args = ["--out", str(tmp_path), "--size", "64", "--rank", "2", "--steps", "200", "--resample-every", "10",
            "--eval-every", "10", "--lrs", "1e-2", "--full-lrs", "3e-3", "--full-steps", "50", "--k-check", "20"]
    if not plot:
        args += ["--spectra", "flat", "--no-plot"]
    out = _bench().main(args)
    stem = tmp_path / "expressivity-2026-11-28"
    assert json.loads(Path(f"{stem}.json").read_text()) == json.loads(json.dumps(out))
    md = Path(f"{stem}.md").read_text()
    assert md.startswith("# Expressivity at 64x64") and "Final error, ROSA / LoRA / best rank-2 update" in md
    assert Path(f"{stem}.png").exists() == plot
    for sp in (["flat", "power"] if plot else ["flat"]):
        pre = f"{sp}_rel_err_"
        for key in ("rosa_r2_final", "lora_r2_final", "full_final", "rank2_optimum", "rosa_r2_curve",
                    "lora_r2_curve", "rosa_r2_lr", "lora_r2_lr", "rosa_r2_k20_final", "rosa_r2_floor"):
            assert pre + key in out, key
        assert len(out[pre + "rosa_r2_curve"]) == len(out[pre + "lora_r2_curve"]) == 21
        assert out[pre + "rosa_r2_curve"][0] == pytest.approx(1.0)
        optimum = out[pre + "rank2_optimum"]
        assert out[pre + "lora_r2_final"] >= optimum - 1e-4, (out[pre + "lora_r2_final"], optimum)
        assert out[pre + "rosa_r2_final"] < 0.9 * optimum, (out[pre + "rosa_r2_final"], optimum)
    for key in ("resample_every", "steps", "seconds", "lrs"):
        assert key in out
