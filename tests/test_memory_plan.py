"""rosa-train --dry-run: the memory estimate against the peaks measured on H200s (committed results),
and the plan printed from a model folder's config without training or writing anything."""
import json
from pathlib import Path

import pytest

from rosa_scale.config import load_config
from rosa_scale.memory_plan import estimate, meta_model

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SHAPES = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (result file, its peak key, shape, processes, compiled, config values of the measured run)
MEASURED = [
    ("fsdp2-2026-11-28-1gpu.json", "rosa_peak_gib", "8b", 1, False, {}),
    ("fsdp2-2026-11-28-2gpu.json", "rosa_peak_gib", "8b", 2, False, {}),
    ("perf-2026-11-30-1gpu-compiled.json", "rosa_peak_gib", "8b", 1, True, {}),
    ("perf-2026-11-30-2gpu-compiled.json", "rosa_peak_gib", "8b", 2, True, {}),
    ("perf-2026-11-30-2gpu-rosa-ckpt.json", "rosa_peak_gib", "8b", 2, True,
     {"gradient_checkpointing": True, "loss_chunk_tokens": 1024}),
    ("perf-2026-11-30-70b-2gpu.json", "rosa_peak_gib", "70b", 2, True,
     {"gradient_checkpointing": True, "loss_chunk_tokens": 1024, "batch_size": 1}),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import LlamaConfig

    out = {}
    for name, shape in SHAPES.items():
        out[name] = tmp_path_factory.mktemp(name)
        LlamaConfig(**shape, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                    tie_word_embeddings=False).save_pretrained(out[name])
    return out


@pytest.mark.parametrize("file,key,shape,processes,compiled,values", MEASURED, ids=[m[0] for m in MEASURED])
def test_estimate_is_within_15_percent_of_the_measured_peak(folders, file, key, shape, processes, compiled, values):
    run = json.loads((RESULTS / file).read_text())
    assert run["rank"] == 16 and run["seq"] == 2048 and run["batch_per_gpu"] == values.get("batch_size", 2)
    cfg = load_config(overrides={"model": str(folders[shape]), "model_dtype": "bfloat16", "mixed_precision": "bf16",
                                 "fsdp": True, "batch_size": 2, "block_size": 2048,
                                 "rosa": {"rank": 16, "target_modules": TARGETS}, **values})
    plan = estimate(meta_model(str(folders[shape]), "bfloat16"), cfg, processes, compiled=compiled)
    assert abs(plan.peak_gib / run[key] - 1) <= 0.15, (plan.parts, run[key])


def test_dry_run_prints_the_plan_and_what_to_change(tiny_model_dir, tmp_path, capsys):
    from rosa_scale.train import main

    out = tmp_path / "never"
    assert main(["--dry-run", "--model", str(tiny_model_dir), "--rosa.rank", "4", "--batch-size", "8",
                 "--processes", "2", "--gpu-memory-gib", "0.001", "--fsdp", "true", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ROSA on 14 layers" in text and "rank 0:" in text and "rank 1:" in text
    assert "does NOT fit" in text and "gradient_checkpointing: true" in text and "batch_size: 4 with grad_accum: 2" in text
    assert not out.exists()
    assert main(["--dry-run", "--model", str(tiny_model_dir), "--processes", "zero"]) == 2


def test_eager_attention_adds_its_attention_matrices_and_the_advice_to_leave_it(folders):
    """Eager attention keeps batch x heads x S^2 probabilities (float32 and bf16) per layer for backward;
    sdpa and flex attention never hold them. With checkpointing only the recomputed layer's stay."""
    cfg = dict(model=str(folders["8b"]), model_dtype="bfloat16", mixed_precision="bf16", fsdp=True, batch_size=2,
               block_size=2048, rosa={"rank": 16, "target_modules": TARGETS})
    sdpa = estimate(meta_model(str(folders["8b"]), "bfloat16"), load_config(overrides=cfg), 2)
    eager_model = meta_model(str(folders["8b"]), "bfloat16", "eager")
    eager = estimate(eager_model, load_config(overrides={**cfg, "attn_implementation": "eager"}), 2)
    one_layer = 2 * 32 * 2048 ** 2 * (4 + 2) / 2 ** 30  # 1.5 GiB
    assert "attention matrices (eager)" not in sdpa.parts
    assert eager.parts["attention matrices (eager)"] == pytest.approx(32 * one_layer)
    assert eager.peak_gib - sdpa.peak_gib == pytest.approx(32 * one_layer)
    checkpointed = estimate(eager_model, load_config(overrides={**cfg, "attn_implementation": "eager",
                                                                 "gradient_checkpointing": True}), 2)
    assert checkpointed.parts["attention matrices (eager)"] == pytest.approx(one_layer)
    from rosa_scale.memory_plan import advice

    assert advice(eager, load_config(overrides=cfg), 2, 40.0)[0].startswith("attn_implementation: sdpa")


def test_replicated_factors_cost_every_process_their_whole_state(folders):
    """fsdp_factors: replicated keeps each factor, its fp32 gradient and AdamW's two moments whole on each
    process: 41.9M factors at 8B, r=16 -> 16 bytes each, not divided by the processes."""
    cfg = dict(model=str(folders["8b"]), model_dtype="bfloat16", mixed_precision="bf16", fsdp=True, batch_size=2,
               block_size=2048, rosa={"rank": 16, "target_modules": TARGETS})
    model = meta_model(str(folders["8b"]), "bfloat16")
    sharded = estimate(model, load_config(overrides={**cfg, "fsdp_factors": "sharded"}), 2)
    whole = estimate(model, load_config(overrides={**cfg, "fsdp_factors": "replicated"}), 2)
    auto = estimate(model, load_config(overrides=cfg), 2)
    factors = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # q,o; k,v; gate,up,down
    assert sharded.trainable == whole.trainable == factors
    assert whole.parts["factors + gradients + optimizer"] == pytest.approx(factors * 16 / 2 ** 30)
    assert sharded.parts["factors + gradients + optimizer"] == pytest.approx(factors * 16 / 2 / 2 ** 30)
    assert auto.parts == whole.parts  # 42M numbers: under auto's 64 Mi, whole
    wide = {**cfg, "rosa": {**cfg["rosa"], "rank": 32}}  # 84M numbers: auto shards them
    assert (estimate(model, load_config(overrides=wide), 2).parts["factors + gradients + optimizer"]
            == pytest.approx(2 * factors * 16 / 2 / 2 ** 30))


def test_auto_factors_are_whole_up_to_64_mi_numbers_and_only_under_fsdp():
    from rosa_scale.config import REPLICATED_FACTORS_MAX_NUMBERS, factors_replicated

    fsdp = load_config(overrides={"fsdp": True})
    assert fsdp.fsdp_factors == "auto"
    assert factors_replicated(fsdp, REPLICATED_FACTORS_MAX_NUMBERS)
    assert not factors_replicated(fsdp, REPLICATED_FACTORS_MAX_NUMBERS + 1)
    assert factors_replicated(load_config(overrides={"fsdp": True, "fsdp_factors": "replicated"}), 10**12)
    assert not factors_replicated(load_config(overrides={"fsdp": True, "fsdp_factors": "sharded"}), 1)
    assert not factors_replicated(load_config(), 1)  # no FSDP2: nothing to leave out
