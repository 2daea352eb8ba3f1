"""Run a command and report its peak resident memory, measured from a small parent of its own.

``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a large process is not the child's peak: Linux carries
the memory high-water mark across ``exec``, and Python starts children with ``vfork``/``fork``, so a
child exec'd from a process holding 15 GiB reports at least 15 GiB whatever it uses itself. A fresh
interpreter that imports nothing but ``subprocess`` starts the command instead; its children's
``ru_maxrss`` is then the command's own peak (plus the few MiB of that parent's image).
"""
from __future__ import annotations

import subprocess
import sys

_PARENT = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run_measured(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process with text stdout/stderr, its peak RSS in MiB); the peak is the last stderr line."""
    proc = subprocess.run([sys.executable, "-c", _PARENT, *cmd], capture_output=True, text=True, **kwargs)
    lines = proc.stderr.rstrip("\n").split("\n")
    peak_mib = int(lines[-1]) / 1024
    proc.stderr = "\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else "")
    return proc, peak_mib
