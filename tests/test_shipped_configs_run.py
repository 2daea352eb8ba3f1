"""The shipped 8B/70B training configs, run as shipped except for size: a tiny model, tiny data
and a few steps, on 2 CPU processes. Everything else (bf16 weights and compute, gradient
checkpointing, accumulation, eigh, the loss in chunks, re-warmup, checkpoints, resume auto) is theirs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.ports import free_port
from tests.proc_failure import stderr_report

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
pytestmark = pytest.mark.slow


def _shrunk(config, model_dir, data, out):
    return ["--config", str(ROOT / config), "--model", str(model_dir), "--dataset", str(data["train"]),
            "--eval-dataset", str(data["eval"]), "--block-size", "32", "--batch-size", "2", "--grad-accum", "2",
            "--max-steps", "4", "--warmup-steps", "1", "--resample-every", "2", "--resample-stagger", "2",
            "--eval-every", "2", "--save-every", "2", "--max-train-blocks", "64", "--max-eval-blocks", "4", "--output-dir", str(out)]


def _check(out, engine, proc):
    assert proc.returncode == 0, stderr_report(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2 and summary["engine"] == engine
    assert (out / "checkpoints" / "latest").read_text().strip().endswith("00000004")
    assert (out / "merged" / "config.json").exists()
    return summary


@pytest.mark.parametrize("config", ["configs/train/llama3-8b-fsdp2-2gpu.yaml", "configs/train/llama3-8b-fsdp2-4gpu.yaml",
                                    "configs/train/llama3-70b-fsdp2-multinode.yaml"])
def test_fsdp2_configs_run_through_torchrun(config, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), *_shrunk(config, tiny_model_dir, tiny_data, out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    _check(out, "fsdp2", proc)
    assert "weights bfloat16, compute bf16" in proc.stdout


def test_zero3_offload_config_runs_through_accelerate(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/zero3_cpu.yaml"), "--deepspeed_config_file",
              str(ROOT / "configs/deepspeed/zero3_offload.json"), "--main_process_port", str(free_port()),
              "-m", "tests.accelerate_cpu"]
    proc = subprocess.run([*launch, *_shrunk("configs/train/llama3-8b-zero3-offload.yaml", tiny_model_dir, tiny_data,
                                             out)], cwd=ROOT, env={**ENV, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=600)
    summary = _check(out, "zero3", proc)
    assert summary["distributed_type"] == "DEEPSPEED"


def test_quantized_one_gpu_configs_run(tiny_model_dir, tiny_data, tmp_path):
    """The NF4 configs in one process: the targets load quantized, paged 8-bit AdamW, bf16 compute, the
    loss in chunks. The 70B config differs from the 8B one in sizes and rates only (checked), so the 8B
    one runs for both."""
    from rosa_scale.config import load_config

    config = "configs/train/llama3-8b-nf4-1gpu-24gb.yaml"
    small, large = (load_config(ROOT / c) for c in (config, "configs/train/llama3-70b-nf4-1gpu.yaml"))
    sizes = {"model", "batch_size", "grad_accum", "max_steps", "lr", "warmup_steps", "output_dir"}
    assert {k: v for k, v in vars(small).items() if k not in sizes} == \
        {k: v for k, v in vars(large).items() if k not in sizes}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rosa_scale.train", *_shrunk(config, tiny_model_dir, tiny_data, out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, stderr_report(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["engine"] == "local"
    assert "weights bfloat16 (ROSA targets nf4, frozen), compute bf16" in proc.stdout
    saved = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert {r.get("quantize") for r in saved["rosa_layers"].values()} == {"nf4"}
    assert saved["config"]["optimizer"] == "paged_adamw8bit" and saved["config"]["loss_chunk_tokens"] == 1024
