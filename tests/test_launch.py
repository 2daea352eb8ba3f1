"""The launchers on one host: two "nodes" of one CPU process each (gloo), a missing node, a
signal, a killed node. Each run asserts the world size it really had."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from tests.ports import free_port
from tests.proc_failure import stderr_report

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GPUS_PER_NODE": "0", "PYTHON": sys.executable}
pytestmark = pytest.mark.slow


def _train_args(model_dir, data, out, steps=12, extra=()):
    return ["--model", str(model_dir), "--dataset", str(data["train"]), "--eval-dataset", str(data["eval"]),
            "--block-size", "32", "--batch-size", "2", "--max-steps", str(steps), "--resample-every", "5",
            "--lr", "1e-2", "--rosa.rank", "4", "--max-train-blocks", "128", "--max-eval-blocks", "8",
            "--output-dir", str(out), *extra]


def _node(rank, port, args, **env):
    env = {**ENV, "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env}
    return subprocess.Popen([str(ROOT / "launch" / "multinode.sh"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _two_nodes(args, **env):
    port = free_port()
    first = _node(0, port, args, **env)
    time.sleep(2)  # node 0 hosts the rendezvous on this shared host
    second = _node(1, port, args, **env)
    return first, second


def _wait_for(predicate, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _steps_logged(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()), default=0)


def test_two_nodes_equal_one_node(tiny_model_dir, tiny_data, tmp_path):
    nodes = _two_nodes(_train_args(tiny_model_dir, tiny_data, tmp_path / "two-nodes"))
    for proc in nodes:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    seen = json.loads((tmp_path / "two-nodes" / "summary.json").read_text())
    assert seen["world_size"] == seen["num_processes"] == 2 and seen["engine"] == "fsdp2"

    one_node = subprocess.run([str(ROOT / "launch" / "torchrun.sh"),
                               *_train_args(tiny_model_dir, tiny_data, tmp_path / "one-node", extra=["--fsdp", "true"])],
                              cwd=ROOT, env={**ENV, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
                              capture_output=True, text=True, timeout=300)
    assert one_node.returncode == 0, stderr_report(one_node)
    a = load_file(tmp_path / "two-nodes" / "merged" / "model.safetensors")
    b = load_file(tmp_path / "one-node" / "merged" / "model.safetensors")
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def test_missing_node_fails_within_the_join_timeout(tiny_model_dir, tiny_data, tmp_path):
    start = time.time()
    proc = _node(0, free_port(), _train_args(tiny_model_dir, tiny_data, tmp_path / "alone"), ROSA_JOIN_TIMEOUT="5")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 90
    assert err.strip().splitlines()[-1].startswith("multinode.sh: error: node 0 of 2 exited with status")


def _workers(proc):
    """The training processes under a launcher (torchrun's agent excluded)."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in tree if "rosa_scale.train" in " ".join(p.cmdline()) and "-u" in p.cmdline()]


def test_sigterm_saves_a_checkpoint_and_a_relaunch_resumes(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "signalled"
    args = _train_args(tiny_model_dir, tiny_data, out, steps=40, extra=["--fsdp", "true", "--resume", "auto"])
    env = {**ENV, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([str(ROOT / "launch" / "torchrun.sh"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert _wait_for(lambda: _steps_logged(out) >= 3, 120)
    workers = _workers(proc)
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    latest = out / "checkpoints" / "latest"
    assert latest.exists(), err[-3000:]
    stopped = int(latest.read_text().split("-")[1])
    assert 3 <= stopped < 40 and not (out / "merged").exists()
    assert f"stopped by a signal at step {stopped}" in stdout and proc.returncode == 75, err[-3000:]

    env["MASTER_PORT"] = str(free_port())
    again = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, stderr_report(again)
    assert f"at step {stopped}" in again.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 40


def _running(procs):
    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in procs if alive(p)]


STOPPED = "torchrun.sh: node 0 of 1 stopped on a signal after saving a checkpoint; relaunch with --resume auto"


def test_a_signal_to_the_launcher_saves_exits_75_leaves_no_process_and_the_relaunch_resumes(
        tiny_model_dir, tiny_data, tmp_path):
    """torchrun starts the training processes in sessions of their own: the launcher passes a signal
    on, waits for the checkpoint and exits 75; torchrun's own forwarding (a group signal) neither
    kills them mid-save nor leaves one running. One run after another (each a relaunch with
    --resume auto of the one before): SIGTERM and SIGUSR1 to the launcher, SIGTERM to its group."""
    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, tiny_data, out, steps=2000, extra=["--fsdp", "true", "--resume", "auto"])
    env = {**ENV, "NPROC_PER_NODE": "2"}
    stopped = 0
    for how, signum in [("launcher", signal.SIGTERM), ("launcher", signal.SIGUSR1), ("group", signal.SIGTERM)]:
        env["MASTER_PORT"] = str(free_port())
        proc = subprocess.Popen([str(ROOT / "launch" / "torchrun.sh"), *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        tree = []
        try:
            assert _wait_for(lambda: _steps_logged(out) >= stopped + 3, 120), (how, signum)
            tree = psutil.Process(proc.pid).children(recursive=True)
            assert len(_workers(proc)) == 2
            os.killpg(proc.pid, signum) if how == "group" else os.kill(proc.pid, signum)
            stdout, err = proc.communicate(timeout=90)
        finally:  # whatever happened, no process of this run may outlive the test
            left, launcher_left = _running(tree), proc.poll() is None
            for p in left + ([psutil.Process(proc.pid)] if launcher_left else []):
                p.kill()
            if launcher_left:
                proc.communicate()
        assert proc.returncode == 75 and err.strip().splitlines()[-1] == STOPPED, (how, signum, err[-3000:])
        assert not left, (how, signum, left)
        assert stopped == 0 or f"at step {stopped}" in stdout  # resumed, not started over
        stopped, before = int((out / "checkpoints" / "latest").read_text().split("-")[1]), stopped
        assert before + 3 <= stopped < 2000 and f"stopped by a signal at step {stopped}" in stdout

    env["MASTER_PORT"] = str(free_port())
    shorter = [*args, "--max-steps", str(stopped + 2), "--resume-override", "[max_steps]"]
    again = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), *shorter], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, stderr_report(again)
    assert f"at step {stopped}" in again.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == stopped + 2


ORPHAN = """
import signal, sys, time
from rosa_scale import launcher_link
launcher_link.register()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(print("SIGTERM", flush=True)))  # rosa-train would save
print("ready", flush=True)
time.sleep(60)
"""


def test_a_training_process_whose_agent_is_killed_gets_sigterm(tmp_path):
    """torchrun's agent SIGKILLed: its training processes are told to stop (PR_SET_PDEATHSIG), not
    left training on their own."""
    log = tmp_path / "worker.log"
    agent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              f"subprocess.Popen([sys.executable, '-c', {ORPHAN!r}], stdout=open({str(log)!r}, 'w')); "
                              "time.sleep(60)"], cwd=ROOT, env={**ENV, "TORCHELASTIC_RUN_ID": "test"})
    try:
        assert _wait_for(lambda: log.exists() and "ready" in log.read_text(), 60)
        worker = psutil.Process(agent.pid).children()[0]
        agent.kill()
        worker.wait(timeout=10)
        assert log.read_text().split() == ["ready", "SIGTERM"]
    finally:
        for p in psutil.Process(agent.pid).children() if agent.poll() is None else []:
            p.kill()
        agent.kill()
        agent.wait()


def test_killed_node_stops_the_survivor_and_both_resume(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "killed"
    args = _train_args(tiny_model_dir, tiny_data, out, steps=60, extra=["--save-every", "5", "--resume", "auto"])
    first, second = _two_nodes(args, ROSA_DIST_TIMEOUT="20")
    assert _wait_for(lambda: (out / "checkpoints" / "latest").exists(), 180)
    node1 = psutil.Process(second.pid)
    for proc in [node1, *node1.children(recursive=True)]:  # node 1 dies: launcher, agent, training process
        proc.kill()
    start = time.time()
    _, err = first.communicate(timeout=120)
    assert first.returncode != 0 and time.time() - start < 90, err[-2000:]  # ROSA_DIST_TIMEOUT=20 s
    second.communicate()

    again = _two_nodes(args)
    for proc in again:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 60


def _sbatch(args, tmp_path, port):
    """launch/slurm.sbatch as SLURM would run it on 2 nodes, with tests/fake_slurm.py for srun & co."""
    from tests import fake_slurm

    bin_dir = tmp_path / "fake-slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    fake_slurm.install(bin_dir)
    log = tmp_path / "slurm.log"
    log.write_text("")
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT),
           "MASTER_PORT": str(port)}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, log


def test_slurm_warning_signal_checkpoints_requeues_and_the_requeued_job_resumes(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "slurm"
    args = _train_args(tiny_model_dir, tiny_data, out, steps=60)
    proc, log = _sbatch(args, tmp_path, free_port())
    assert _wait_for(lambda: _steps_logged(out) >= 3, 180)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends to the batch shell
    stdout, err = proc.communicate(timeout=180)
    events = log.read_text().splitlines()
    assert "scancel USR1" in events and "requeue 4242" in events, err[-3000:]
    assert proc.returncode == 75 and "requeueing job 4242" in err
    stopped = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    assert 3 <= stopped < 60 and not (out / "merged").exists()
    assert f"stopped by a signal at step {stopped}" in stdout

    again, log = _sbatch(args, tmp_path, free_port())  # the requeued job: same script, --resume auto
    stdout, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"at step {stopped}" in stdout  # resumed, not started over
    assert not any(e.startswith("requeue") for e in log.read_text().splitlines())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["world_size"] == 2 and summary["engine"] == "fsdp2"


def test_local_launcher_on_cpu_shards_with_fsdp2(tiny_model_dir, tiny_data, tmp_path):
    """NPROC CPU processes on a GPU-less node must run FSDP2, not silently fall back to DDP."""
    out = tmp_path / "local"
    env = {k: v for k, v in ENV.items() if k != "GPUS_PER_NODE"}  # as a user runs it: GPUs counted, none found
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), *_train_args(tiny_model_dir, tiny_data, out, steps=3)],
                          cwd=ROOT, env={**env, "NPROC": "2", "MASTER_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, stderr_report(proc)
    seen = json.loads((out / "summary.json").read_text())
    assert seen["engine"] == "fsdp2" and seen["world_size"] == seen["num_processes"] == 2
