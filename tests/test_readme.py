"""The README is part of the product: its quick start is what CI runs, and its examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_quick_start_is_two_commands_and_ci_runs_them_verbatim():
    (block,) = code_blocks(section("Quick start"), "bash")
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci_lines, f".ci/run does not run the README command {command!r}"


def test_numpy_examples_run():
    for block in code_blocks(section("NumPy usage"), "python"):
        exec(compile(block, "README.md", "exec"), {})


def test_16_bit_examples_run():
    pytest.importorskip("ml_dtypes")
    pytest.importorskip("torch")
    blocks = code_blocks(section("16-bit storage and mixed precision"), "python")
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_the_checkout_holds_no_package_but_the_pure_python_one():
    """A Python started in the checkout (python -m pytest, python -c, a notebook) has it first on sys.path, so a
    package directory there hides any installed package of its name: a kernels/ hid PyPI's kernels package, which
    transformers imports, and the kernels' own package there would hide the installed build's compiled modules
    (they are under src/). The README's layout paragraph names the directories."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["normkit"]
    assert (ROOT / "src" / "normkit_kernels" / "__init__.py").is_file() and not (ROOT / "src" / "__init__.py").exists()
