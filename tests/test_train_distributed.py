"""rosa-train on 2 CPU processes (gloo), DDP, FSDP2 and ZeRO-3: really distributed, equal to one process.

accelerate silently runs separate single-process jobs when misconfigured, so the test
checks the distributed type and world size the run itself saw.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.ports import free_port
from tests.proc_failure import stderr_report


def _args(model_dir, data, out, batch_size):
    return ["-m", "rosa_scale.train", "--model", str(model_dir), "--dataset", str(data["train"]),
            "--eval-dataset", str(data["eval"]), "--block-size", "32", "--batch-size", str(batch_size),
            "--max-steps", "12", "--resample-every", "4", "--lr", "1e-2", "--rosa.rank", "4",
            "--max-train-blocks", "256", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, *_args(tiny_model_dir, tiny_data, out, 4)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, stderr_report(proc)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine,extra", [
    ("local", []), ("fsdp2", ["--fsdp", "true", "--fsdp-factors", "sharded", "--gradient-checkpointing", "true"]),
    ("fsdp2", ["--fsdp", "true", "--batch-size", "1", "--grad-accum", "2"])],
    ids=["ddp", "fsdp2-sharded-factors", "fsdp2-default-factors-accumulated"])
def test_two_processes_match_one_process(engine, extra, single_run, tiny_model_dir, tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    two = subprocess.run([*launch, *_args(tiny_model_dir, tiny_data, tmp_path / "two", 2), *extra],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, stderr_report(two)

    seen = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert seen["distributed_type"] == "MULTI_CPU" and seen["engine"] == engine
    assert seen["num_processes"] == seen["world_size"] == 2
    assert seen["replicated_factors"] == (engine == "fsdp2" and "sharded" not in extra)  # auto: a tiny model's are whole

    # same global batch (4 = 2 x 2), same windows: the merged models agree up to fp32 reduction
    # order, which Adam amplifies over 12 steps to ~1e-4 at most
    one = load_file(single_run / "merged" / "model.safetensors")
    other = load_file(tmp_path / "two" / "merged" / "model.safetensors")
    assert one.keys() == other.keys()
    for name in one:
        torch.testing.assert_close(other[name], one[name], rtol=0, atol=5e-4, msg=name)
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = [n for n in one if (one[n] - start[n]).abs().max() > 1e-3]
    assert any("proj" in n for n in moved)  # training really changed the weights being compared


def test_uneven_targets_weigh_the_same_on_two_processes(tiny_model_dir, tiny_data, tmp_path):
    """Padded blocks hold different numbers of targets, so each process's mean loss covers a different
    count: two processes still train the model one process does with the same 4 blocks per step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    padded = ["--packing", "padded", "--max-steps", "8", "--lr", "3e-2"]
    runs = {"one": ([sys.executable], 4), "two": (launch, 2)}
    for name, (start, batch) in runs.items():
        proc = subprocess.run([*start, *_args(tiny_model_dir, tiny_data, tmp_path / name, batch), *padded],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, stderr_report(proc)
    one = load_file(tmp_path / "one" / "merged" / "model.safetensors")
    two = load_file(tmp_path / "two" / "merged" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.slow
def test_accelerate_launch_with_the_cpu_config_really_shards(tiny_model_dir, tiny_data, tmp_path):
    """configs/accelerate/fsdp2_cpu.yaml + --fsdp true: two processes, FSDP2 engine in effect."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp2_cpu.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--main_process_port", str(free_port()), "-m", "rosa_scale.train"]
    args = _args(tiny_model_dir, tiny_data, tmp_path / "acc", 2)[2:]
    proc = subprocess.run([*launch, *args, "--max-steps", "4", "--fsdp", "true"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, stderr_report(proc)
    seen = json.loads((tmp_path / "acc" / "summary.json").read_text())
    assert seen["engine"] == "fsdp2" and seen["num_processes"] == seen["world_size"] == 2
    assert seen["replicated_factors"]  # fsdp_factors: auto, a few factors: whole on each process


def test_fsdp_on_one_process_is_refused(tiny_model_dir, tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, *_args(tiny_model_dir, tiny_data, tmp_path / "x", 2), "--fsdp", "true"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "rosa-train: error: fsdp: true needs a launch of 2 or more processes" in proc.stderr


def test_shipped_accelerate_configs_load():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(root.glob("*.yaml"))}
    assert configs["fsdp2"].distributed_type == "FSDP" and configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp2_cpu"].use_cpu and configs["fsdp2_cpu"].num_processes == 2
    assert configs["zero3"].distributed_type == "DEEPSPEED"
    for name in ("zero3", "zero3_cpu"):
        ds_file = Path(__file__).resolve().parents[1] / configs[name].deepspeed_config["deepspeed_config_file"]
        assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 3


def _accelerate_run(config, out, args, extra=()):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / config), *extra,
              "--main_process_port", str(free_port()), "-m", "tests.accelerate_cpu"]
    return subprocess.run([*launch, *args], capture_output=True, text=True, env=env, timeout=600, cwd=root)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config,leaf,checkpointing", [("configs/deepspeed/zero3.json", "true", "false"),
                                                           ("configs/deepspeed/zero3_offload.json", "true", "true"),
                                                           ("configs/deepspeed/zero3.json", "false", "false")])
def test_accelerate_deepspeed_zero3_matches_one_process(ds_config, leaf, checkpointing, single_run, tiny_model_dir,
                                                        tiny_data, tmp_path):
    """Both shipped DeepSpeed configs (16-bit gather on save on and off; offload) through accelerate,
    with decoder layers fetched whole (leaf modules, the default, on DeepSpeed's fast path) and module
    by module; offload with gradient checkpointing as configs/train's ZeRO-3 config runs it, so leaf
    layers are fetched again for the recompute in backward."""
    out = tmp_path / "z3"
    args = [*_args(tiny_model_dir, tiny_data, out, 2)[2:], "--zero3-leaf-layers", leaf,
            "--gradient-checkpointing", checkpointing]
    proc = _accelerate_run("configs/accelerate/zero3_cpu.yaml", out, args, ["--deepspeed_config_file", ds_config])
    assert proc.returncode == 0, stderr_report(proc)
    seen = json.loads((out / "summary.json").read_text())
    assert seen["distributed_type"] == "DEEPSPEED" and seen["engine"] == "zero3"
    assert seen["num_processes"] == seen["world_size"] == 2
    assert seen["zero3_fast_leaf_fetch"] is (leaf == "true")  # named leaves take DeepSpeed's fast fetch
    one = load_file(single_run / "merged" / "model.safetensors")
    other = load_file(out / "merged" / "model.safetensors")
    assert one.keys() == other.keys()
    for name in one:
        torch.testing.assert_close(other[name], one[name], rtol=0, atol=5e-4, msg=name)


def _granularities(module, out: dict) -> tuple[int, int]:
    """DeepSpeed's module granularity (``stage3_module_granularity_threshold``): params // (modules with
    params below, itself included); containers and modules without children never become leaves."""
    if not list(module.parameters()):
        return 0, 0
    params = sum(p.numel() for p in module.parameters(recurse=False))
    if not any(module.children()):
        return 1, params
    layers = 0
    for child in module.children():
        child_layers, child_params = _granularities(child, out)
        layers, params = layers + child_layers, params + child_params
    if type(module).__name__ in torch.nn.modules.container.__all__:
        return layers, params
    out[module] = params // (layers + 1)
    return layers + 1, params


@pytest.mark.slow
def test_zero3_leaves_chosen_by_deepspeed_train(single_run, tiny_model_dir, tiny_data, tmp_path):
    """With ``zero3_leaf_layers: false`` and DeepSpeed choosing leaf modules by granularity, the
    decoder layers become leaves all the same; their weights are fetched for backward only if the
    embedding output requires grad, which rosa-train must then arrange (else backward fails)."""
    from transformers import AutoModelForCausalLM

    from rosa_scale import RosaConfig, apply_rosa

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_rosa(model, RosaConfig(rank=4), split=False)
    grains: dict = {}
    _granularities(model, grains)
    layer = max(g for m, g in grains.items() if type(m).__name__ == "LlamaDecoderLayer")
    assert grains[model] > layer and grains[model.model] > layer  # only the layers (and their parts) qualify
    config = json.loads((Path(__file__).resolve().parents[1] / "configs/deepspeed/zero3.json").read_text())
    config["zero_optimization"]["stage3_module_granularity_threshold"] = layer
    ds = tmp_path / "zero3-granularity.json"
    ds.write_text(json.dumps(config))
    out = tmp_path / "z3"
    args = [*_args(tiny_model_dir, tiny_data, out, 2)[2:], "--zero3-leaf-layers", "false"]
    proc = _accelerate_run("configs/accelerate/zero3_cpu.yaml", out, args, ["--deepspeed_config_file", str(ds)])
    assert proc.returncode == 0, stderr_report(proc)
    assert json.loads((out / "summary.json").read_text())["zero3_fast_leaf_fetch"] is True
    one = load_file(single_run / "merged" / "model.safetensors")
    other = load_file(out / "merged" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(other[name], one[name], rtol=0, atol=5e-4, msg=name)


def test_deepspeed_stage_below_3_is_refused(tiny_model_dir, tiny_data, tmp_path):
    stage2 = tmp_path / "zero2.json"
    stage2.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}))
    out = tmp_path / "z2"
    proc = _accelerate_run("configs/accelerate/zero3_cpu.yaml", out, _args(tiny_model_dir, tiny_data, out, 2)[2:],
                           ["--deepspeed_config_file", str(stage2)])
    assert proc.returncode != 0
    assert "rosa-train: error: DeepSpeed ZeRO stage 2 is not supported" in proc.stderr
    assert not out.exists()
