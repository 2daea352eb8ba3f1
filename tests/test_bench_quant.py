"""bench/quant_bench.py --tiny on CPU: ROSA over NF4 and PEFT QLoRA over the same NF4 base both train.

The GPU run of this bench is the one that compares them; this keeps the script from rotting: every
key the report reads is written, steps take time, and the two start from the same loss (same base,
adapters that start at zero change).
"""
import json

import pytest

from tests.bench_module import load_bench



def _bench():
    return load_bench("quant_bench")


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


def test_layerwise_build_materializes_one_decoder_layer_at_a_time():
    """Each decoder layer is converted while every later one is still on the meta device (so a 70B
    model never exists whole in bf16), and nothing is left on meta at the end."""
    import torch

    bench = _bench()
    args = bench.parse_args(["--tiny", "--layers", "3", "--out", "unused.json"])
    model, requires_grad = bench.meta_model(args)
    layers = model.get_decoder().layers
    seen = []

    def convert(prefix, layer):
        seen.append((prefix, [any(p.is_meta for p in block.parameters()) for block in layers]))
        assert not any(p.is_meta for p in layer.parameters())

    bench.materialize_layerwise_(model, torch.device("cpu"), convert, seed=0)
    assert [p for p, _ in seen] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    for i, (_, meta) in enumerate(seen):
        assert meta == [j > i for j in range(3)], (i, meta)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(requires_grad.values()) and not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, args.vocab, (1, 8))
    loss = model(input_ids=ids, labels=ids).loss  # random init: close to log(vocab)
    assert abs(float(loss) - torch.log(torch.tensor(float(args.vocab)))) < 0.5


def test_quant_bench_tiny_layerwise_chunked(tmp_path):
    """The 70B path at the tiny shape: layer-by-layer build, chunked loss, the resample estimate and
    its qr fallback (a budget of 0 s), ROSA and QLoRA over the same NF4 base."""
    for name in ("bitsandbytes", "peft"):
        try:
            __import__(name)
        except ImportError as exc:
            pytest.skip(f"{name} is not importable ({exc})")
    path = tmp_path / "quant.json"
    rc = _bench().main(["--tiny", "--in-process", "--layerwise", "--chunked-loss", "--loss-chunk", "7",
                        "--init-method", "qr", "--resample-budget-s", "0", "--modes", "rosa_nf4", "qlora_nf4",
                        "--out", str(path)])
    out = json.loads(path.read_text())
    assert rc == 0, {k: v for k, v in out.items() if k.startswith("error_")}
    for suffix in ("nf4_rosa", "nf4_qlora"):
        assert out[f"loss_chunked_check_tiny_{suffix}"] == pytest.approx(out[f"loss_model_check_tiny_{suffix}"],
                                                                          rel=1e-4)
        assert out[f"layer_gib_bf16_tiny_{suffix}"] > 0 and out[f"tok_s_tiny_{suffix}"] > 0
    # the same seed gives the same random base layer by layer: both start from the same loss
    assert out["loss_first_tiny_nf4_rosa"] == pytest.approx(out["loss_first_tiny_nf4_qlora"], rel=1e-3)
    assert out["resample_est_s_eigh_tiny_nf4_rosa"] > 0
    assert out["resample_method_tiny_nf4_rosa"] == "qr" and out["resample_matrices_tiny_nf4_rosa"] == 14
    assert out["loss_after_resample_tiny_nf4_rosa"] == pytest.approx(out["loss_last_tiny_nf4_rosa"], abs=0.1)
    assert out["loss"] == "chunked (7 tokens)" and out["build"] == "layer by layer from meta"
