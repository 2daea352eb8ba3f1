"""rosa-train over a quantized base: exact resume with an 8-bit optimizer, a checkpoint that
rosa-consolidate turns into the same plain model as the run's own export, and the refusals."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'rosa-scale[bnb]')")

from rosa_scale import apply_rosa  # noqa: E402
from rosa_scale.config import ConfigError, RosaConfig, TrainConfig  # noqa: E402
from rosa_scale.consolidate import main as consolidate_main  # noqa: E402
from tests.test_resume import ENV, _args, _losses  # noqa: E402
from tests.proc_failure import stderr_report  # noqa: E402


def _run(cmd, ok=True, env=ENV):
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert proc.returncode == 0, stderr_report(proc)
    return proc


def _resume_copy(src, dst, step: int):
    name = f"step-{step:08d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name + "\n")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nf4_adamw8bit_run_resumes_bitwise_and_consolidates_to_its_export(device, tiny_model_dir, tiny_data, tmp_path):
    """20 steps, resamples at 7 and 14, checkpoints at 10 and 20. Resumed from 10 (its stack holds the
    quantization error's rank-2 fit and one folded window, the optimizer 8-bit state), the run repeats
    the losses and merged weights bitwise; rosa-consolidate of the last checkpoint writes the run's own
    merged export, bit for bit, as a plain model (no quantization config) that transformers loads. On a GPU: bf16 weights and compute,
    the paged 8-bit AdamW."""
    from transformers import AutoModelForCausalLM

    quant = ["--rosa.quantize", "nf4", "--optimizer", "adamw8bit", "--save-every", "10", "--rosa.quant-error-rank", "2"]
    env = ENV
    if device == "cuda":
        env = {k: v for k, v in ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
        quant = [*quant[:3], "paged_adamw8bit", *quant[4:], "--model-dtype", "bfloat16", "--mixed-precision", "bf16"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = _run(_args(tiny_model_dir, tiny_data, straight, 4, 20, [*quant, "--keep-last", "null"]), env=env)
    assert f"on {device}" in proc.stdout
    state = json.loads((straight / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    layer = "model.layers.0.mlp.up_proj"
    assert state["rosa_layers"][layer] == {"transposed": False, "rank": 4, "quantize": "nf4"}
    assert state["stack_columns"][layer] == 2 + 2 * 4  # the error's rank-2 fit, one window: [up - up0, up0]
    _resume_copy(straight, resumed, 10)
    _run(_args(tiny_model_dir, tiny_data, resumed, 4, 20, [*quant, "--resume", "auto"]), env=env)

    a, resampled_a = _losses(straight)
    b, _ = _losses(resumed)
    assert set(b) == set(range(11, 21)) and resampled_a == {7, 14}
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(b)]
    assert a[20] < a[1]
    merged = load_file(straight / "merged" / "model.safetensors")
    again = load_file(resumed / "merged" / "model.safetensors")
    assert merged.keys() == again.keys() and all(torch.equal(merged[k], again[k]) for k in merged)

    out = tmp_path / "hf"
    assert consolidate_main([str(straight), str(out), "--no-progress"]) == 0
    consolidated = load_file(out / "model.safetensors")
    assert consolidated.keys() == merged.keys()
    for key, value in merged.items():
        if device == "cpu":
            assert torch.equal(consolidated[key], value), key
        else:  # merged on the GPU, consolidated on the CPU: fp32 sums in another order, one bf16 step apart at most
            gap = (consolidated[key].float() - value.float()).abs().max().item()
            scale = value.float().abs().max().item()
            assert gap <= 2**-8 * scale, f"{key}: {gap:.3g} apart at scale {scale:.3g}"
    for folder in (out, straight / "merged"):
        assert "quantization_config" not in (folder / "config.json").read_text()
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert type(plain.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_resume_on_another_base_is_refused(tmp_path):
    """The base is quantized again at every start, never loaded: its checksums must be the ones the
    checkpoint recorded, else (other weights, another bitsandbytes) the resume is refused in one line.
    A run whose checksums match resumes (the test above)."""
    from rosa_scale.checkpoint import CheckpointError, _check_quantized_base, _fingerprint
    from rosa_scale.model import rosa_layers
    from tests.tiny import tiny_llama

    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=4, quantize="int8"))
    recorded = {n: _fingerprint(layer) for n, layer in rosa_layers(model).items()}
    _check_quantized_base(model, recorded, tmp_path)
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight[0, 0] += 0.01
    apply_rosa(other, RosaConfig(rank=4, quantize="int8"))
    with pytest.raises(CheckpointError, match=r"trained on another quantized base: model.layers.1.self_attn.o_proj.base "
                                              r"differs"):
        _check_quantized_base(other, recorded, tmp_path)


def test_engines_that_cannot_hold_a_quantized_base_refuse_in_one_line():
    from rosa_scale.run_model import refuse_quantized_engine

    with pytest.raises(ConfigError, match="not supported under DeepSpeed ZeRO-3"):
        refuse_quantized_engine(TrainConfig(rosa=RosaConfig(quantize="nf4")), accelerate_fsdp=False, deepspeed=True)
    with pytest.raises(ConfigError, match="'adamw8bit' is not supported under DeepSpeed"):
        refuse_quantized_engine(TrainConfig(optimizer="adamw8bit"), accelerate_fsdp=False, deepspeed=True)
    with pytest.raises(ConfigError, match="accelerate's FSDP plugin"):
        refuse_quantized_engine(TrainConfig(rosa=RosaConfig(quantize="int8")), accelerate_fsdp=True, deepspeed=False)
    refuse_quantized_engine(TrainConfig(), accelerate_fsdp=True, deepspeed=True)  # nothing quantized: fine


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tiny_model_dir, tiny_data, tmp_path):
    """FSDP2 over an NF4 base (the base whole on each rank, the factors sharded or whole), 2 gloo processes,
    against one process on the same global batch: they differ by fp32 reduction order only, which
    Adam amplifies over 12 steps at lr 1e-2 (measured: 5e-7 before the first resample, 1e-6 to 1e-5 in
    the two steps after it, by CPU: the window merged and split in another order; 2.4e-4 by step 12,
    5.2e-3 in the merged weights that training moved by 0.085; DDP on 2 processes gave FSDP2's losses
    exactly). The sharded checkpoint consolidates to FSDP2's own export, bit for bit."""
    from tests.ports import free_port
    from tests.test_train_distributed import _args as dist_args

    quant = ["--rosa.quantize", "nf4"]
    runs = {"one": [sys.executable, *dist_args(tiny_model_dir, tiny_data, tmp_path / "one", 4), *quant]}
    fsdp = {"fsdp2": ["--fsdp", "true", "--save-every", "12", "--fsdp-factors", "sharded"],
            "fsdp2-replicated": ["--fsdp", "true", "--save-every", "12", "--fsdp-factors", "replicated"]}
    for name, extra in fsdp.items():
        runs[name] = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(free_port()),
                      *dist_args(tiny_model_dir, tiny_data, tmp_path / name, 2), *quant, *extra]
    for cmd in runs.values():
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, stderr_report(proc)
    for name in fsdp:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["engine"] == "fsdp2" and summary["replicated_factors"] == name.endswith("replicated")
    losses = {name: _losses(tmp_path / name)[0] for name in runs}
    merged = {name: load_file(tmp_path / name / "merged" / "model.safetensors") for name in runs}
    start = load_file(tiny_model_dir / "model.safetensors")
    for name in fsdp:
        for step, loss in losses["one"].items():
            assert abs(losses[name][step] - loss) <= (2e-6 if step <= 4 else 5e-5 if step <= 6 else 1e-3), (name, step)
        for key, value in merged["one"].items():
            torch.testing.assert_close(merged[name][key], value, rtol=0, atol=1e-2, msg=key)
        out = tmp_path / f"hf-{name}"
        assert consolidate_main([str(tmp_path / name), str(out), "--no-progress"]) == 0
        consolidated = load_file(out / "model.safetensors")
        assert all(torch.equal(consolidated[k], v) for k, v in merged[name].items())
    assert max((merged["one"][k] - start[k]).abs().max() for k in start) > 0.05  # training moved the weights
