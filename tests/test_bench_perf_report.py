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
