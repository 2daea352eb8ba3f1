"""tests/rank_runs.run_ranks: a launch whose rank died in C++ (as torchrun reports it) is started once
more; a Python error or a plain failure is not. The launches here are stand-ins printing torchrun's report."""
import sys

import pytest

from tests.rank_runs import run_ranks

ABORT = "terminate called without an active exception\n  exitcode  : -6 (pid: 15021)  (SIGABRT)\n"
RAISED = "Traceback (most recent call last):\nValueError: bad\n  exitcode  : 1 (pid: 15021)\n"


def _launch(tmp_path, reports: list[str]):
    """A command that, on its k-th start, prints ``reports[k]`` to stderr and fails (passes when '')."""
    count = tmp_path / "starts"
    script = (f"import sys, pathlib; p = pathlib.Path({str(count)!r}); k = int(p.read_text()) if p.exists() else 0; "
              f"p.write_text(str(k + 1)); r = {reports!r}[k]; sys.stderr.write(r); sys.exit(1 if r else 0)")
    ports = []

    def command(port):
        ports.append(port)
        return [sys.executable, "-c", script]
    return command, count, ports


def test_an_abort_in_cpp_is_started_once_more_on_another_port(tmp_path):
    command, count, ports = _launch(tmp_path, [ABORT, ""])
    with pytest.warns(UserWarning, match="a rank died on a signal; started again"):
        proc = run_ranks(command)
    assert proc.returncode == 0 and count.read_text() == "2" and len(ports) == 2


def test_a_second_abort_fails(tmp_path):
    command, count, _ = _launch(tmp_path, [ABORT, ABORT, ""])
    with pytest.warns(UserWarning):
        proc = run_ranks(command)
    assert proc.returncode == 1 and count.read_text() == "2"


@pytest.mark.parametrize("report", [RAISED, "error: something else\n"], ids=["python error", "plain failure"])
def test_other_failures_are_not_retried(tmp_path, report):
    command, count, _ = _launch(tmp_path, [report, ""])
    proc = run_ranks(command)
    assert proc.returncode == 1 and count.read_text() == "1"
