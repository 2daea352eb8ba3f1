"""Exact resume: a run stopped (or killed) after a checkpoint continues to the same losses and model."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tests.ports import free_port
from tests.proc_failure import stderr_report

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _args(model_dir, data, out, batch_size, steps, extra=()):
    return ["-m", "rosa_scale.train", "--model", str(model_dir), "--dataset", str(data["train"]),
            "--eval-dataset", str(data["eval"]), "--block-size", "32", "--batch-size", str(batch_size),
            "--max-steps", str(steps), "--resample-every", "7", "--lr", "1e-2", "--rosa.rank", "4",
            "--max-train-blocks", "96", "--max-eval-blocks", "8", "--output-dir", str(out), *extra]


def _losses(out):
    """Loss per step (the last record of a step wins: a killed run may have logged it twice)."""
    losses, resampled = {}, set()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
        if "resample_s" in record:
            resampled.add(record["step"])
    return losses, resampled


def _run(cmd):
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, stderr_report(proc)
    return proc


def test_one_process_resume_is_bitwise(tiny_model_dir, tiny_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(_args(tiny_model_dir, tiny_data, straight, 4, 30, ["--save-every", "10", "--keep-last", "null"]))
    assert sorted(p.name for p in (straight / "checkpoints").glob("step-*")) == \
        ["step-00000010", "step-00000020", "step-00000030"]
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000010", resumed / "checkpoints" / "step-00000010")
    (resumed / "checkpoints" / "latest").write_text("step-00000010\n")
    proc = _run(_args(tiny_model_dir, tiny_data, resumed, 4, 30, ["--save-every", "10", "--resume", "auto"]))
    assert "resumed from" in proc.stdout and "at step 10 (resample 1)" in proc.stdout

    a, resampled_a = _losses(straight)
    b, resampled_b = _losses(resumed)
    assert set(b) == set(range(11, 31))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(b)]  # bitwise, across an epoch end
    assert resampled_b == {s for s in resampled_a if s > 10} == {14, 21, 28}
    x, y = load_file(straight / "merged" / "model.safetensors"), load_file(resumed / "merged" / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step-*")) == ["step-00000020", "step-00000030"]


@pytest.mark.slow
@pytest.mark.parametrize("factors", ["sharded", "replicated"])
def test_two_process_fsdp2_killed_and_resumed(factors, tiny_model_dir, tiny_data, tmp_path):
    """SIGKILL of both ranks after a checkpoint, relaunch with --resume auto: same losses and model;
    with the factors sharded like the weights or whole on each rank (fsdp_factors)."""
    steps = 60
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def launch(out, extra=()):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *_args(tiny_model_dir, tiny_data, out, 2, steps,
                                                           ["--fsdp", "true", "--fsdp-factors", factors,
                                                            "--save-every", "10", *extra])]

    subprocess.run(launch(straight), check=True, capture_output=True, env=ENV, timeout=600)
    proc = subprocess.Popen(launch(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, mid-run
    proc.wait()
    stopped_at = int(latest.read_text().strip().split("-")[1])
    assert stopped_at < steps, "the run ended before it could be killed"
    assert not (killed / "merged").exists()

    subprocess.run(launch(killed, ["--resume", "auto"]), check=True, capture_output=True, env=ENV, timeout=600)
    a, resampled_a = _losses(straight)
    b, resampled_b = _losses(killed)
    after = sorted(s for s in b if s > stopped_at)
    assert after == list(range(stopped_at + 1, steps + 1))
    # same data, windows and optimizer state: equal up to fp32 reduction order (bitwise in practice)
    assert [b[s] for s in after] == pytest.approx([a[s] for s in after], rel=1e-6, abs=1e-6)
    assert {s for s in resampled_b if s > stopped_at} == {s for s in resampled_a if s > stopped_at}
    x, y = load_file(straight / "merged" / "model.safetensors"), load_file(killed / "merged" / "model.safetensors")
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-6, msg=k)


def _error(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rosa-train: error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]


def test_resume_errors(tiny_model_dir, tiny_data, tmp_path, capsys):
    def run(args):  # rosa-train's main in this process: the refusals come before any training
        from rosa_scale.train import main

        assert args[:2] == ["-m", "rosa_scale.train"]
        code = main(args[2:])
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    _error(run(_args(tiny_model_dir, tiny_data, tmp_path / "a", 4, 4, ["--resume", str(tmp_path / "none")])),
           "not a complete checkpoint")
    _run(_args(tiny_model_dir, tiny_data, tmp_path / "b", 4, 4, ["--save-every", "4"]))
    other = _args(tiny_model_dir, tiny_data, tmp_path / "b", 4, 8, ["--resume", "auto", "--rosa.rank", "8"])
    _error(run(other), "rosa.rank 4 -> 8")
    forced = _args(tiny_model_dir, tiny_data, tmp_path / "b", 4, 8, ["--resume", "auto", "--rosa.rank", "8",
                                                                      "--resume-override", "[rosa.rank]"])
    _error(run(forced), "was written for other ROSA layers or ranks")  # an override cannot reshape the factors


@pytest.mark.slow
def test_zero3_resume_through_accelerate(tiny_model_dir, tiny_data, tmp_path):
    """DeepSpeed's own checkpoint restores w_fixed, factors, fp32 masters and moments: bitwise here."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**ENV, "DS_ACCELERATOR": "cpu"}

    def launch(out, extra=()):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "configs/accelerate/zero3_cpu.yaml"), "--main_process_port", str(free_port()),
               "-m", "tests.accelerate_cpu",
               *_args(tiny_model_dir, tiny_data, out, 2, 20, ["--save-every", "10", *extra])[2:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
        assert proc.returncode == 0, stderr_report(proc)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight)
    state = json.loads((straight / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["format"] == "deepspeed" and state["world_size"] == 2
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000010", resumed / "checkpoints" / "step-00000010")
    (resumed / "checkpoints" / "latest").write_text("step-00000010\n")
    launch(resumed, ["--resume", "auto"])
    a, _ = _losses(straight)
    b, resampled = _losses(resumed)
    assert sorted(b) == list(range(11, 21)) and resampled == {14}
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(b)], rel=1e-6, abs=1e-6)
    x, y = load_file(straight / "merged" / "model.safetensors"), load_file(resumed / "merged" / "model.safetensors")
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-6, msg=k)
