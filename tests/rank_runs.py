"""Multi-process test runs that survive one abort of the gloo transport itself.

On a loaded 2-core machine a gloo rank very rarely dies in C++ with "terminate called without an
active exception" (SIGABRT, no Python error). That says nothing about the code under test, so such a
run is started once more, on a fresh port, and the first failure is reported as a warning. Any
other failure (a Python error, an exit status, a timeout) fails at once.
"""
from __future__ import annotations

import re
import subprocess
import warnings
from typing import Callable

from tests.ports import free_port

SIGNAL_DEATH = re.compile(r"exitcode\s*:\s*-(6|11)\b.*\(SIG(ABRT|SEGV)\)")


def run_ranks(command: Callable[[int], list[str]], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command(port), capture_output=True, text=True, **kwargs)``, once more if a
    rank was killed by SIGABRT/SIGSEGV and no rank raised a Python error."""
    proc = subprocess.run(command(free_port()), capture_output=True, text=True, **kwargs)
    ranks_own = proc.stderr.split("elastic/multiprocessing/api.py")[0]  # before the launcher's report
    if proc.returncode != 0 and SIGNAL_DEATH.search(proc.stderr) and "Traceback (most recent call last)" not in ranks_own:
        warnings.warn(f"a rank died on a signal; started again. First run's stderr tail:\n{proc.stderr[-2000:]}")
        proc = subprocess.run(command(free_port()), capture_output=True, text=True, **kwargs)
    return proc
