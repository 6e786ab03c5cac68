"""``normkit check`` in a child process: a kernel that crashes the process, ends it or never returns is reported as
a failure naming the case it happened in, where in-process it would take the check, and its report, with it.

The parent runs the same command in a child whose environment names a progress file (:data:`PROGRESS`). The child
appends each case's label to it before running the case, and, once its report is printed, a last line saying the
exit code it is about to exit with: a child that ends any other way (a signal, ``os._exit``, a hang past the
timeout, an ``atexit`` handler that crashes) failed, and the last label names the case. A case that ended a child
runs again alone in another (:data:`ONLY`): if it ends that one too, the check goes on in a new child that skips
it and every earlier such case (:data:`CRASHED`; up to :data:`MAX_CRASHES` of them), so that one report covers all
the cases: a kernel that crashes on one shape says nothing of the others. If it passes alone, a case before it may
have damaged the process, and the check stops there, as it does at a hang (each would cost the whole timeout).
The child imports from the parent's ``sys.path``, not from the directory it starts in.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Optional

import click

PROGRESS = "_NORMKIT_CHECK_PROGRESS"  # in the child: the file the case labels go to
CRASHED = "_NORMKIT_CHECK_CRASHED"  # in the child: {case label: what happened} of the cases not to run again, JSON
ONLY = "_NORMKIT_CHECK_ONLY"  # in the child: the label of the one case to run, if set
# the most crashed cases that the check goes on past (each new child runs the cases before them again); a crash
# beyond them stops it
MAX_CRASHES = 10
_PATH = "_NORMKIT_CHECK_PATH"  # in the child: the parent's sys.path, as JSON
_END = "\0end "  # the progress file's last line once the child's report is printed: "\0end <exit code>"
# the child: the parent's sys.path (python -m would put the directory it starts in first), then the command line
_CHILD = ("import json, os, sys; sys.path[:] = json.loads(os.environ.pop({path!r})); "
          "from normkit.cli import main; main(prog_name='normkit')")
# signals after which faulthandler has printed the Python stack (it cannot run on SIGKILL)
_STACK_SIGNALS = {signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL}


class Child(NamedTuple):
    """What the check needs in the child: the callbacks that write a case's label and the end line, the cases that
    ended earlier children, and the one case to run (None: all)."""
    progress: Callable[[str], None]
    finish: Callable[[int], None]
    crashed: dict[str, str]
    only: Optional[str]


def in_child() -> Optional[Child]:
    """In the child: its :class:`Child`; None in any other process. Crashes print the Python stack they happened
    under (the parent shows the child's stderr)."""
    path = os.environ.get(PROGRESS)
    if path is None:
        return None
    crashed, only = json.loads(os.environ.pop(CRASHED, "{}")), os.environ.pop(ONLY, None)
    import faulthandler

    faulthandler.enable()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def finish(code: int) -> None:
        sys.stdout.flush()  # (the report is out before the line that says so)
        sys.stderr.flush()
        os.write(fd, f"{_END}{code}\n".encode())

    return Child(lambda label: os.write(fd, label.encode() + b"\n"), finish, crashed, only)


def run(backend: str, argv: list[str], timeout: float) -> int:
    """``normkit check`` with ``argv`` (the backend first) in a child; echoes its output and returns the exit
    code, 1 with a failure line where the child failed to finish. SIGTERM and Ctrl-C stop the child too."""
    crashed: dict[str, str] = {}
    while True:
        returncode, hung, lines, stdout, stderr = _run_child(argv, timeout, crashed)
        ended = lines and lines[-1].startswith(_END)
        if ended or hung or not lines or len(crashed) == MAX_CRASHES:
            break
        # a case ended the child: if it does so alone too, say so and run the check again without it
        label, (how, detail) = lines[-1], _ended(returncode)
        where = _where(lines) + detail
        click.echo(stdout, nl=False)
        click.echo(stderr, nl=False, err=True)
        alone = _run_child(argv, timeout, crashed, only=label)[2]
        if alone and alone[-1].startswith(_END):
            click.echo(f"backend {backend!r} FAILS: {how} {where}; that case passes in a process of its own, so a "
                       f"case before it may have damaged the process: the check stopped there.{_hint(returncode)}")
            return 1
        click.echo(f"backend {backend!r} FAILS: {how} {where}, and alone too; the check goes on in a new process, "
                   f"without that case.{_hint(returncode)}")
        crashed[label] = how
    click.echo(stdout, nl=False)
    click.echo(stderr, nl=False, err=True)
    if ended:
        code = int(lines[-1][len(_END):])
        if not hung and returncode == code:
            return code
        how = (f"did not exit within {timeout:g} s" if hung else f"crashed ({_signal_name(-returncode)})"
               if returncode < 0 else f"exited with code {returncode}")
        click.echo(f"backend {backend!r} FAILS: after its report the check's process {how} (a thread or an atexit "
                   f"handler that the backend started?)")
        return 1
    where = _where(lines)
    stopped = "; the check stopped there" + (f" (after {len(crashed)} cases that crashed it)" if crashed else "")
    if hung:
        click.echo(f"backend {backend!r} FAILS: a kernel did not return within {timeout:g} s {where}{stopped} "
                   f"(--timeout sets the limit)")
    elif returncode == 2 and not lines:  # a usage error, which the child printed
        return 2
    else:
        how, detail = _ended(returncode)
        click.echo(f"backend {backend!r} FAILS: {how} {where}{detail}{stopped}.{_hint(returncode)}")
    return 1


def _run_child(argv: list[str], timeout: float, crashed: dict[str, str],
               only: Optional[str] = None) -> tuple[int, bool, list[str], str, str]:
    """One child running the check, skipping the ``crashed`` cases (running only case ``only``, if given): its exit
    code, whether it hung (and was killed), the lines of its progress file, its stdout and stderr."""
    with tempfile.TemporaryDirectory(prefix="normkit-check-") as tmp:
        paths = {name: os.path.join(tmp, name) for name in ("progress", "stdout", "stderr")}
        open(paths["progress"], "wb").close()
        env = {**os.environ, PROGRESS: paths["progress"], _PATH: json.dumps(sys.path), CRASHED: json.dumps(crashed)}
        if only is not None:
            env[ONLY] = only
        with open(paths["stdout"], "wb") as out, open(paths["stderr"], "wb") as err, _terminated_as_exit():
            child = subprocess.Popen([sys.executable, "-c", _CHILD.format(path=_PATH), "check", *argv],
                                     stdout=out, stderr=err, env=env)
            try:
                hung = _wait(child, paths["progress"], timeout)
            finally:  # (Ctrl-C, SIGTERM: the child must not outlive the check)
                if child.poll() is None:
                    child.kill()
                    child.wait()
        return (child.returncode, hung, _read(paths["progress"]).splitlines(), _read(paths["stdout"]),
                _read(paths["stderr"]))


def _where(lines: list[str]) -> str:
    """Where a child that did not finish its report stopped, from its progress file's lines."""
    return f"in case {lines[-1]} ({len(lines) - 1} cases ran before it)" if lines else "before its first case"


def _ended(returncode: int) -> tuple[str, str]:
    """What ended a child before its report (not a hang), and what to add after the case it happened in."""
    if returncode >= 0:
        return (f"the check's process exited with code {returncode}",
                ", before its report (a kernel that calls os._exit, or the error printed above)")
    if -returncode == signal.SIGKILL:
        return "the check's process was killed (SIGKILL: out of memory?)", ""
    return (f"it crashed the process ({_signal_name(-returncode)})",
            "; its Python stack is above" if -returncode in _STACK_SIGNALS else "")


def _hint(returncode: int) -> str:
    if -returncode in (signal.SIGSEGV, signal.SIGBUS):
        return (" If the kernel reads or writes memory: in each case some arrays start one element past a 64-byte "
                "boundary, and a kernel may assume no alignment beyond the element's (see plugins/README.md).")
    return ""


def _wait(child: subprocess.Popen, progress: str, timeout: float) -> bool:
    """Wait for the child; True if it went ``timeout`` seconds without starting a case (or ending), and was killed."""
    size, since = 0, time.monotonic()
    while child.poll() is None:
        time.sleep(0.05)
        now = os.path.getsize(progress)
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since > timeout:  # (before the first case: imports, loading the kernels)
            child.kill()
            child.wait()
            return True
    return False


class _terminated_as_exit:
    """SIGTERM (a job's timeout, ``kill``) raises SystemExit while the child runs, so that it is stopped and the
    temporary files go; outside the main thread, where no handler can be set, nothing changes."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._exit)
        except ValueError:
            self.previous = None
        return self

    @staticmethod
    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")  # (a kernel may print anything)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def timeout_option(ctx, param, value: float) -> float:
    """``--timeout``: seconds, positive (inf: no limit)."""
    if math.isnan(value) or value <= 0:
        raise click.BadParameter(f"must be a positive number of seconds (inf: no limit), got {value}")
    return value
