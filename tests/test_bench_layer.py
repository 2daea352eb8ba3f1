"""bench/layer_bench.py: one decoder layer per mode, timed in alternating rounds, paired against ROSA."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("extra", [[], ["--checkpointing", "--profile", "1"]])
def test_every_mode_is_timed_in_each_round_and_paired_with_rosa(tmp_path, extra):
    import layer_bench

    out = tmp_path / "layer.json"
    result = layer_bench.main(["--device", "cpu", "--tiny", "--modes", "frozen,rosa,rosa_ungrouped",
                               "--rounds", "3", "--steps", "1", "--warmup", "1", "--depth", "2", "--out", str(out),
                               *extra])
    assert json.loads(out.read_text()) == result and result["checkpointing"] == bool(extra) and result["depth"] == 2
    for mode in ("frozen", "rosa", "rosa_ungrouped"):
        assert len(result[f"{mode}_ms_rounds"]) == 3 and result[f"{mode}_ms"] > 0 and result[f"{mode}_host_ms"] > 0
    assert "rosa_minus_rosa_ms" not in result and "frozen_over_frozen" not in result
    assert result["frozen_over_rosa"] == pytest.approx(result["frozen_ms"] / result["rosa_ms"])
    if extra:
        assert result["rosa_profile"]["profile_steps"] == 1 and "kernel_us_by_name" in result["rosa_profile"]


def test_an_unknown_mode_is_one_error_line(tmp_path, capsys):
    import layer_bench

    with pytest.raises(SystemExit):
        layer_bench.main(["--device", "cpu", "--tiny", "--modes", "rosa,lora", "--out", str(tmp_path / "x.json")])
    assert "unknown mode 'lora'" in capsys.readouterr().err


def test_the_gemm_modes_turn_off_the_kernels_they_name():
    import torch

    import layer_bench
    from rosa_scale import rosa_layers

    args = layer_bench.parse_args(["--device", "cpu", "--tiny", "--depth", "1", "--out", "unused.json"],
                                  modes=layer_bench.MODES, methods="", extra=layer_bench.extra_args)
    for mode, forward, backward in (("rosa", True, True), ("rosa_forward_gemms", False, True),
                                    ("rosa_gemms", False, False)):
        layers = rosa_layers(layer_bench.build_layers(args, torch.device("cpu"), mode)).values()
        assert layers and all((m.forward_kernels, m.backward_kernels) == (forward, backward) for m in layers), mode
