"""bench/quant_bench.py --tiny on CPU: ROSA over NF4 and PEFT QLoRA over the same NF4 base both train.

The GPU run of this bench is the one that compares them; this keeps the script from rotting: every
key the report reads is written, steps take time, and the two start from the same loss (same base,
adapters that start at zero change).
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quant_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quant_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quant_bench_tiny(tmp_path):
    for name in ("bitsandbytes", "peft"):
        try:  # imported here, not at collection: bitsandbytes takes seconds
            __import__(name)
        except ImportError as exc:
            pytest.skip(f"{name} is not importable ({exc}); the test extras do not install it yet")
    path = tmp_path / "quant.json"
    # in this process: one interpreter start instead of one per mode keeps the test near 15 s on 2 cores
    rc = _bench().main(["--tiny", "--in-process", "--modes", "rosa_nf4", "qlora_nf4", "--out", str(path)])
    out = json.loads(path.read_text())
    assert rc == 0, {k: v for k, v in out.items() if k.startswith("error_")}
    for suffix in ("nf4_rosa", "nf4_qlora"):
        for key in ("tok_s", "step_s", "peak_gib", "peak_gib_with_warmup", "loss_first", "loss_last"):
            assert f"{key}_tiny_{suffix}" in out
        assert out[f"tok_s_tiny_{suffix}"] > 0
        assert out[f"trainable_params_tiny_{suffix}"] > 0
    assert out["resample_s_tiny_nf4_rosa"] > 0
    assert out["loss_after_resample_tiny_nf4_rosa"] == pytest.approx(out["loss_last_tiny_nf4_rosa"], abs=0.1)
    assert out["lora_layer_types_tiny_nf4_qlora"] == "peft.tuners.lora.bnb.Linear4bit"
    assert out["loss_first_tiny_nf4_rosa"] == pytest.approx(out["loss_first_tiny_nf4_qlora"], rel=1e-3)
    assert out["rosa_over_qlora_tok_s"] > 0
    for key in ("torch", "transformers", "peft", "bitsandbytes", "device_name", "git_head"):
        assert key in out
