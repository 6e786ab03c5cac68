"""The CLI's own commands (bench and check have their own test modules)."""

from __future__ import annotations

import os
import subprocess
import sys

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


_CRASHING_KERNELS = """\
import ctypes
from normkit import reference

calls = []

def forward(*args):
    calls.append(1)
    if len(calls) == 3:
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
    assert "(2 cases ran before it)" in proc.stdout and "one element past a 64-byte boundary" in proc.stdout
    assert "Fatal Python error: Segmentation fault" in proc.stderr and "crashy_kernels.py" in proc.stderr


def test_check_runs_each_selected_case_once_and_takes_all():
    one = CliRunner().invoke(main, ["check", "reference", "--op", "ln", "--dtype", "float32", "--quick"])
    twice = CliRunner().invoke(main, ["check", "reference", "--op", "ln", "--op", "layernorm", "--dtype", "float32",
                                      "--dtype", "float32", "--quick"])
    assert one.exit_code == twice.exit_code == 0 and one.output == twice.output
    every = CliRunner().invoke(main, ["check", "reference", "--op", "all", "--dtype", "float32", "--quick"])
    assert every.exit_code == 0
    assert int(every.output.split(": ")[1].split()[0]) > int(one.output.split(": ")[1].split()[0])
