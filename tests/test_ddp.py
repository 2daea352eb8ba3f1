"""rosa-train under DDP: 2 CPU processes (gloo) really run together and match one process.

accelerate silently runs separate single-process jobs when misconfigured, so the test
checks the distributed type and world size the run itself saw.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model_dir, data, out, batch_size):
    return ["-m", "rosa_scale.train", "--model", str(model_dir), "--dataset", str(data["train"]),
            "--eval-dataset", str(data["eval"]), "--block-size", "32", "--batch-size", str(batch_size),
            "--max-steps", "12", "--resample-every", "4", "--lr", "1e-2", "--rosa.rank", "4",
            "--max-train-blocks", "256", "--output-dir", str(out)]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_model_dir, tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single = subprocess.run([sys.executable, *_args(tiny_model_dir, tiny_data, tmp_path / "one", 4)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    ddp = subprocess.run([*launch, *_args(tiny_model_dir, tiny_data, tmp_path / "two", 2)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    seen = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert seen["distributed_type"] == "MULTI_CPU"
    assert seen["num_processes"] == seen["world_size"] == 2
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["world_size"] == 1

    # same global batch (4 = 2 x 2), same windows: the merged models agree to fp32 reduction order
    one = load_file(tmp_path / "one" / "merged" / "model.safetensors")
    two = load_file(tmp_path / "two" / "merged" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = [n for n in one if (one[n] - start[n]).abs().max() > 1e-3]
    assert any("proj" in n for n in moved)  # training really changed the weights being compared
