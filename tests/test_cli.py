"""The CLI's own commands (bench and check have their own test modules)."""

from __future__ import annotations

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
