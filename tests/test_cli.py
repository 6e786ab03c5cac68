"""The CLI's own commands (bench and check have their own test modules)."""

from __future__ import annotations

import subprocess
import sys

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


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output


def test_python_m_normkit_cli_runs_the_cli():
    """`python -m normkit.cli check no-such-backend` exited 0 having done nothing: a false green in a plugin's CI."""
    proc = subprocess.run([sys.executable, "-m", "normkit.cli", "check", "no-such-backend"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown backend 'no-such-backend'" in proc.stderr


def test_check_runs_each_selected_case_once_and_takes_all():
    one = CliRunner().invoke(main, ["check", "reference", "--op", "ln", "--dtype", "float32", "--quick"])
    twice = CliRunner().invoke(main, ["check", "reference", "--op", "ln", "--op", "layernorm", "--dtype", "float32",
                                      "--dtype", "float32", "--quick"])
    assert one.exit_code == twice.exit_code == 0 and one.output == twice.output
    every = CliRunner().invoke(main, ["check", "reference", "--op", "all", "--dtype", "float32", "--quick"])
    assert every.exit_code == 0
    assert int(every.output.split(": ")[1].split()[0]) > int(one.output.split(": ")[1].split()[0])
