"""bench/perf_report.py: issue #17's ratios read from fsdp2_bench's files, the local (no fsdp) runs included."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_ratios_pair_the_modes_of_one_run_and_read_local_modes_as_their_fsdp_names(tmp_path):
    import perf_report

    prefix = str(tmp_path / "perf-x")
    runs = {"1gpu-compiled": {"frozen_tok_s_per_gpu": 100.0, "rosa_tok_s_per_gpu": 92.0, "peft_lora_tok_s_per_gpu": 80.0,
                              "rosa_ungrouped_tok_s_per_gpu": 90.0, "rosa_peak_gib": 40.0},
            "1gpu-peft-eager": {"peft_lora_tok_s_per_gpu": 64.0},
            "1gpu-local": {"frozen_local_tok_s_per_gpu": 200.0, "rosa_local_tok_s_per_gpu": 190.0,
                           "rosa_local_ungrouped_tok_s_per_gpu": 180.0, "rosa_local_unfused_tok_s_per_gpu": 170.0}}
    for name, run in runs.items():
        (tmp_path / f"perf-x-{name}.json").write_text(json.dumps(run))
    flat = perf_report.summarize(prefix)
    assert flat["rosa_over_frozen_1gpu"] == pytest.approx(0.92)
    assert flat["rosa_over_peft_compiled_1gpu"] == pytest.approx(1.15)
    assert flat["rosa_over_peft_1gpu"] == pytest.approx(92 / 64)
    assert flat["rosa_over_ungrouped_1gpu"] == pytest.approx(92 / 90)
    assert flat["rosa_over_frozen_1gpu_local"] == pytest.approx(0.95)
    assert flat["rosa_over_ungrouped_1gpu_local"] == pytest.approx(190 / 180)
    assert flat["rosa_over_unfused_1gpu_local"] == pytest.approx(190 / 170)
    assert flat["target_met_rosa_over_frozen_1gpu"] is False and flat["target_met_rosa_over_peft_1gpu"] is True


def _run_perf(tmp_path, parts, **env):
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "run_perf.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DEVICE": "cpu", **env}
    return subprocess.run(["bash", str(script), "1", str(tmp_path), "t", parts], capture_output=True, text=True,
                          env=env, timeout=300)


def test_run_perf_writes_the_files_perf_report_reads_and_skips_what_the_budget_cannot_hold(tmp_path):
    """A part that would overrun the call's budget is skipped (exit 3), what ran is where perf_report looks."""
    import perf_report

    proc = _run_perf(tmp_path, "peft-eager rosa-ckpt", BUDGET_S="20", PART_S="20")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rosa-ckpt skipped" in proc.stdout
    assert not (tmp_path / "t-1gpu-rosa-ckpt.json").exists()
    assert perf_report.load(str(tmp_path / "t"), "1gpu-peft-eager")["peft_lora_tok_s_per_gpu"] > 0


def test_run_perf_refuses_an_unknown_part_before_running_anything(tmp_path):
    proc = _run_perf(tmp_path, "peft-eager compiledd")
    assert proc.returncode == 2 and "unknown part 'compiledd'" in proc.stderr
    assert list(tmp_path.iterdir()) == []
