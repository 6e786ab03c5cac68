"""The CLI's own commands (bench and check have their own test modules)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import normkit
from normkit.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"normkit, version {normkit.__version__}"


def test_list_shows_every_backend_op_and_the_dispatch_order():
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    for backend in normkit.get_backend_order():
        assert f"\n{backend}  [" in "\n" + result.output
    for op in normkit.list_ops():
        assert f"    {op}: " in result.output
    assert "groupnorm: backward (float32, float64); forward (float32, float64)" in result.output
    assert f"dispatch order: {', '.join(normkit.get_backend_order())}" in result.output


def test_list_says_which_backends_in_the_dispatch_order_failed_to_load():
    from normkit.registry import runtime_module

    normkit.register_backend(normkit.Backend("hollow", runtime_module({}), kernels={"layernorm": ("forward",)}))
    try:
        with pytest.warns(RuntimeWarning, match="hollow"):
            result = CliRunner().invoke(main, ["list"])
        assert result.exit_code == 0, result.output
        order = ", ".join(normkit.get_backend_order())
        assert f"dispatch order: {order} (hollow: failed to load, skipped)" in result.output
    finally:
        normkit.unregister_backend("hollow")


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output


def test_python_m_normkit_cli_runs_the_cli():
    """`python -m normkit.cli check no-such-backend` exited 0 having done nothing: a false green in a plugin's CI."""
    proc = subprocess.run([sys.executable, "-m", "normkit.cli", "check", "no-such-backend"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown backend 'no-such-backend'" in proc.stderr


# The kernel fails in the quick check's third case (its x is (6, 1)), in every process that runs it: a rerun of the
# case alone (which the check makes to tell a crashing case from a process damaged earlier) meets it again.
_CRASHING_KERNELS = """\
import os
import ctypes
from normkit import reference


def forward(*args):
    if args[0].shape == (6, 1):
        ctypes.string_at(0)  # a read at address 0: SIGSEGV, as a kernel reading where it assumed alignment
    reference.KERNELS[("layernorm", "forward", "float64")](*args)

KERNELS = {("layernorm", "forward", "float32"): forward}
"""


def _installed_plugin(tmp_path, kernels_source: str) -> dict:
    """A backend "crashy" (layernorm forward, float32) installed in tmp_path: the environment to run it in."""
    (tmp_path / "crashy_kernels.py").write_text(kernels_source)
    (tmp_path / "crashy_decl.py").write_text(
        "from normkit import Backend\nbackend = Backend(name='crashy', module='crashy_kernels', "
        "kernels={'layernorm': ('forward',)}, dtypes=('float32',))\n")
    info = tmp_path / "crashy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crashy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[normkit.backends]\ncrashy = crashy_decl:backend\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}


def test_check_reports_a_kernel_that_never_returns(tmp_path):
    """A kernel that blocks hung `normkit check` forever, with no output: --timeout bounds each case."""
    env = _installed_plugin(tmp_path, _CRASHING_KERNELS.replace("ctypes.string_at(0)", "__import__('time').sleep(600)"))
    proc = subprocess.run([sys.executable, "-m", "normkit.cli", "check", "crashy", "--quick", "--timeout", "3"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("backend 'crashy' FAILS: a kernel did not return within 3 s in case layernorm "
                                  "forward float32 shape="), proc.stdout
    assert "(2 cases ran before it); the check stopped there (--timeout sets the limit)" in proc.stdout


def test_check_reports_a_kernel_that_crashes_the_process(tmp_path):
    """A plugin kernel that segfaults (on the kit's misaligned arrays, say) killed `normkit check` with no word on
    what failed: the check runs in a child process and names the case the kernel died in."""
    env = _installed_plugin(tmp_path, _CRASHING_KERNELS)
    proc = subprocess.run([sys.executable, "-m", "normkit.cli", "check", "crashy", "--quick"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("backend 'crashy' FAILS: it crashed the process (SIGSEGV) in case layernorm "
                                  "forward float32 shape="), proc.stdout
    assert "(2 cases ran before it); its Python stack is above, and alone too; the check goes on in a new process, " \
           "without that case." in proc.stdout and "one element past a 64-byte boundary" in proc.stdout
    assert "Fatal Python error: Segmentation fault" in proc.stderr and "crashy_kernels.py" in proc.stderr
    # the new process ran the other nine cases, and the report counts the crash
    assert "\nbackend 'crashy' FAILS: 1 of 10 cases failed; failed checks: crashed (1)\n" in proc.stdout
    assert "shape=" in proc.stdout.split("failed checks: crashed (1)\n")[1]


def test_check_goes_on_past_each_crash_up_to_a_limit(tmp_path, monkeypatch, capsys):
    """`normkit check` stopped at a plugin's first crash, saying nothing of the other cases: each crash now
    starts a new process without the case, up to MAX_CRASHES of them."""
    from normkit import check_process

    source = _CRASHING_KERNELS.replace("if args[0].shape == (6, 1):", "if args[0].shape in ((6, 1), (33, 16)):")
    env = _installed_plugin(tmp_path, source)
    proc = _check(env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the first process dies in case 3, the second (cases 1, 2, 4, ...) in case 4, the third runs the rest
    assert proc.stdout.count(", and alone too; the check goes on in a new process, without that case.") == 2, \
        proc.stdout
    assert "\nbackend 'crashy' FAILS: 2 of 10 cases failed; failed checks: crashed (2)\n" in proc.stdout
    (tmp_path / "crashy_kernels.py").write_text(source.replace("if args[0].shape in ((6, 1), (33, 16)):", "if 1:"))
    monkeypatch.setattr(check_process, "MAX_CRASHES", 2)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert check_process.run("crashy", ["crashy", "--quick"], 300.0) == 1
    out = capsys.readouterr().out
    assert out.count("and alone too; the check goes on in a new process, without that case.") == 2, out
    assert out.endswith("; its Python stack is above; the check stopped there (after 2 cases that crashed it). If "
                        "the kernel reads or writes memory: in each case some arrays start one element past a 64-byte "
                        "boundary, and a kernel may assume no alignment beyond the element's (see plugins/README.md)."
                        "\n"), out


def test_check_stops_where_a_crash_follows_from_an_earlier_case(tmp_path):
    """From the review of the rerun: a case that damages the process (here: sets a flag) and makes the next one
    crash had every later case blamed in turn, up to the limit, and the culprit passed. A crashing case now runs
    alone once more; where it passes alone, the check stops there and says so."""
    source = _CRASHING_KERNELS.replace("def forward(*args):\n", "damaged = []\n\n\ndef forward(*args):\n    if damaged:\n"
                                       "        ctypes.string_at(0)\n").replace("        ctypes.string_at(0)  # a read",
                                                                                "        damaged.append(1)  # a read")
    proc = _check(_installed_plugin(tmp_path, source))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("backend 'crashy' FAILS: it crashed the process (SIGSEGV) in case layernorm "
                                  "forward float32 shape=(33, 16)"), proc.stdout
    assert "that case passes in a process of its own, so a case before it may have damaged the process: the check " \
           "stopped there." in proc.stdout
    assert "goes on in a new process" not in proc.stdout


def _check(env, *args, cwd=None, python=(sys.executable,)):
    return subprocess.run([*python, "-m", "normkit.cli", "check", "crashy", "--quick", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


@pytest.mark.parametrize("third_call, stdout", [
    ("os._exit(0)", "backend 'crashy' FAILS: the check's process exited with code 0 in case layernorm forward"),
    ("os.kill(os.getpid(), signal.SIGKILL)", "backend 'crashy' FAILS: the check's process was killed (SIGKILL: "
                                             "out of memory?) in case layernorm forward"),
    ("sys.exit(3)", "backend 'crashy' FAILS: 1 of 10 cases failed; failed checks: raised (1)"),
])
def test_check_reports_a_kernel_that_ends_the_process(tmp_path, third_call, stdout):
    """A kernel calling os._exit(0) passed the check (exit 0, no output), sys.exit(3) ended it with no word of the
    case; SIGKILL's message claimed a Python stack that faulthandler cannot print there."""
    source = _CRASHING_KERNELS.replace("import ctypes", "import os, signal, sys").replace("ctypes.string_at(0)",
                                                                                       third_call)
    proc = _check(_installed_plugin(tmp_path, source))
    assert proc.returncode == 1 and proc.stdout.startswith(stdout), proc.stdout + proc.stderr
    assert "Python stack" not in proc.stdout


def test_check_blames_no_case_for_what_happens_after_the_report(tmp_path):
    """An atexit handler (or a thread) of the backend that misbehaves after the report is no case's failure."""
    source = _CRASHING_KERNELS.replace("import ctypes", "import atexit, os\natexit.register(os._exit, 5)").replace(
        "ctypes.string_at(0)", "pass")
    proc = _check(_installed_plugin(tmp_path, source))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("backend 'crashy' conforms: 10 cases passed")
    assert "FAILS: after its report the check's process exited with code 5" in proc.stdout


def test_check_takes_any_output_and_stops_its_child_on_sigterm(tmp_path):
    """Bytes that are no UTF-8 on a kernel's stdout crashed the parent; SIGTERM (a job's timeout) left the child
    running and the temporary files behind."""
    source = _CRASHING_KERNELS.replace("import ctypes", "import os, sys, time").replace(
        "ctypes.string_at(0)", "sys.stdout.buffer.write(b'\\xff\\n'); sys.stdout.flush()")
    proc = _check(_installed_plugin(tmp_path, source))
    assert proc.returncode == 0 and "backend 'crashy' conforms" in proc.stdout, proc.stdout + proc.stderr
    pid_file = tmp_path / "child.pid"
    source = _CRASHING_KERNELS.replace("import ctypes", "import os, time").replace(
        "ctypes.string_at(0)", f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    (tmp_path / "hang").mkdir()
    env = _installed_plugin(tmp_path / "hang", source)
    parent = subprocess.Popen([sys.executable, "-m", "normkit.cli", "check", "crashy", "--quick"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    parent.communicate(timeout=60)
    assert parent.returncode == 128 + signal.SIGTERM
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_check_options_and_imports(tmp_path):
    """--timeout nan switched the timeout off; the child imported normkit from the directory it started in (an old
    checkout there broke the check); the plugin scan's warnings came twice, from the parent and the child."""
    env = _installed_plugin(tmp_path, _CRASHING_KERNELS.replace("ctypes.string_at(0)", "pass"))
    proc = _check(env, "--timeout", "nan")
    assert proc.returncode == 2 and "must be a positive number of seconds (inf: no limit), got nan" in proc.stderr
    shadow = tmp_path / "shadow" / "normkit"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('an old checkout')\n")
    if sys.version_info >= (3, 11):  # (-P: the parent does not import from its directory, as a console script)
        proc = _check(env, cwd=shadow.parent, python=(sys.executable, "-P"))
        assert proc.returncode == 0 and "backend 'crashy' conforms" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "normkit.cli", "check", "reference", "--quick", "--op", "ln",
                           "--timeout", "inf"], capture_output=True, text=True, timeout=300,
                          env={**env, "NORMKIT_DISABLE_PLUGINS": "maybe"})
    assert proc.returncode == 0 and proc.stderr.count("NORMKIT_DISABLE_PLUGINS='maybe' is not one of") == 1, \
        proc.stdout + proc.stderr


def test_check_runs_each_selected_case_once_and_takes_all():
    one = CliRunner().invoke(main, ["check", "reference", "--op", "ln", "--dtype", "float32", "--quick"])
    twice = CliRunner().invoke(main, ["check", "reference", "--op", "ln", "--op", "layernorm", "--dtype", "float32",
                                      "--dtype", "float32", "--quick"])
    assert one.exit_code == twice.exit_code == 0 and one.output == twice.output
    every = CliRunner().invoke(main, ["check", "reference", "--op", "all", "--dtype", "float32", "--quick"])
    assert every.exit_code == 0
    assert int(every.output.split(": ")[1].split()[0]) > int(one.output.split(": ")[1].split()[0])
