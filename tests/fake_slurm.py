"""Stand-ins for srun, scontrol and scancel, so launch/slurm.sbatch runs on one host.

Installed as executables named after the command (see ``install``). srun starts one task per
node (SLURM_NODEID set; node 0 first, as it hosts the rendezvous) and fails if any task fails;
scancel --signal delivers the signal to every process of every task, as slurmstepd does;
scontrol answers ``show hostnames`` with 127.0.0.1 and records ``requeue`` in FAKE_SLURM_LOG.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _log(line: str) -> None:
    with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
        f.write(line + "\n")


def srun(argv):
    first = next(i for i, a in enumerate(argv) if not a.startswith("--"))
    command = argv[first:]
    tasks = []
    for node in range(int(os.environ["SLURM_NNODES"])):
        tasks.append(subprocess.Popen(command, env={**os.environ, "SLURM_NODEID": str(node)}))
        _log(f"task {tasks[-1].pid}")
        time.sleep(2)
    codes = [t.wait() for t in tasks]
    return next((c for c in codes if c != 0), 0)


def scancel(argv):
    import psutil

    sig = next(a.split("=", 1)[1] for a in argv if a.startswith("--signal="))
    pids = [int(line.split()[1]) for line in Path(os.environ["FAKE_SLURM_LOG"]).read_text().splitlines()
            if line.startswith("task ")]
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                proc.send_signal(getattr(signal, f"SIG{sig}"))
            except psutil.NoSuchProcess:
                pass
    _log(f"scancel {sig}")
    return 0


def scontrol(argv):
    if argv[:2] == ["show", "hostnames"]:
        print("127.0.0.1")
        return 0
    if argv[0] == "requeue":
        _log(f"requeue {argv[1]}")
        return 0
    return 1


def install(folder: Path) -> None:
    """Write srun/scontrol/scancel executables into ``folder`` (put it first on PATH)."""
    for name in ("srun", "scontrol", "scancel"):
        path = folder / name
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                        f"import fake_slurm\nsys.exit(fake_slurm.{name}(sys.argv[1:]))\n")
        path.chmod(0o755)
