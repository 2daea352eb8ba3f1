"""What a failed subprocess printed, cut for an assertion message: the tail of its stderr, and where
a process died in C++ (SIGABRT, SIGSEGV), the faulthandler's report from the start, which the
launcher's own traceback and the extension-module list would otherwise push out of the tail."""
import subprocess

FAULT_MARKERS = ("Fatal Python error", "terminate called", "Segmentation fault")


def stderr_report(proc: subprocess.CompletedProcess, tail: int = 3000, fault: int = 4000) -> str:
    err = proc.stderr or ""
    starts = [i for i in (err.find(m) for m in FAULT_MARKERS) if i >= 0]
    if not starts or min(starts) >= len(err) - tail:
        return err[-tail:]
    start = min(starts)
    return err[start:start + fault] + "\n[...]\n" + err[-tail:]
