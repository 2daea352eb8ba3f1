"""bench/quant_survival.py at 128x128, K=3: what each design keeps of the merged updates.

A base kept frozen with a stack of factors must keep every merged update (survival 1 within fp32
rounding, no output jump), while re-quantizing an NF4 base in place must round a small update
away: if either fails, the bench (or bitsandbytes) no longer measures what the choice rests on.
"""
import json

import pytest

from tests.bench_module import load_bench

SIZES = ("1e-3", "1e-2", "5e-2")


def _bench():
    return load_bench("quant_survival")


def test_quant_survival_bench_small(tmp_path):
    try:  # imported here, not at collection: it takes seconds
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"bitsandbytes is not importable ({exc}); the test extras do not install it yet")
    path = tmp_path / "out.json"
    out = _bench().main(["--out", str(path), "--shape", "128x128", "--resamples", "3"])
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    for q in ("nf4", "fp4", "int8"):
        for s in SIZES:
            key = f"{q}_{s}"
            # Design 1: nothing is re-rounded, in one resample or three.
            assert out[f"survival_stack_{key}"] == pytest.approx(1, abs=1e-6)
            assert out[f"accum_survival_stack_{key}"] == pytest.approx(1, abs=1e-6)
            assert out[f"accum_error_stack_{key}"] < 1e-5
            assert out[f"out_change_stack_{key}"] < 1e-6
            # Its bf16 variant rounds only the update (stored as differences), not up0 down0.
            assert out[f"accum_error_stack_bf16_{key}"] < 1e-2
        # Design 2 loses nothing on average at the largest size, but jumps at the resample.
        assert out[f"accum_survival_master_{q}_5e-2"] == pytest.approx(1, abs=0.1)
        assert out[f"out_change_master_{q}_1e-2"] > 100 * out[f"out_change_stack_{q}_1e-2"]
        assert out[f"memory_host_bytes_master_{q}"] == 128 * 128 * 4
        assert out[f"memory_stack_bytes_stack_{q}"] == 3 * 2 * 16 * (128 + 128) * 4
        assert out[f"memory_stack_bytes_stack_bf16_{q}"] == out[f"memory_stack_bytes_stack_{q}"] // 2
    # Design 3 with NF4: a small update rounds back to the same codes.
    assert out["survival_inplace_nf4_1e-3"] < 0.2
    assert out["accum_survival_inplace_nf4_1e-3"] < 0.2
    assert out["survival_nf4"] == out["survival_inplace_nf4_1e-2"] < 0.5
