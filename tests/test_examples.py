"""The examples in examples/ run in --quick mode, write valid PNG figures and print numbers in range."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 120
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM = r"([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)"


def run_example(name: str, out: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit code {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\nstdout:\n{proc.stdout}"
    return proc.stdout


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, f"{path} is not a PNG"


def numbers(pattern: str, text: str) -> list[float]:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return [float(g) for g in match.groups()]


def test_bn_activations(tmp_path):
    pytest.importorskip("torch")
    out = run_example("bn_activations.py", tmp_path)
    assert_png(tmp_path / "bn_activations.png")
    lo, hi = numbers(rf"before BN: per-feature mean in \[{NUM}, {NUM}\]", out)
    assert hi - lo > 1.0  # the pre-activations' means differ from feature to feature
    max_mean, var_lo, var_hi = numbers(rf"after BN: max \|mean\| = {NUM}, variance in \[{NUM}, {NUM}\]", out)
    assert max_mean < 1e-5 and 0.999 < var_lo <= var_hi < 1.0 + 1e-5
    diffs = numbers(rf"max \|normkit - torch.nn\|: output {NUM}, running_mean {NUM}, running_var {NUM}", out)
    assert all(d < 1e-4 for d in diffs), diffs


def test_which_values(tmp_path):
    out = run_example("which_values.py", tmp_path)
    assert_png(tmp_path / "which_values.png")
    n, c, groups = 4, 6, 2
    expected_sets = {"BatchNorm": c, "LayerNorm": n, "InstanceNorm": n * c, "GroupNorm": n * groups}
    for op, sets in expected_sets.items():
        count, per_set, max_mean, var_lo, var_hi = numbers(
            rf"{op}.*?saved mean shape .*? {NUM} sets of +{NUM} values; output per set: max \|mean\| = {NUM}, "
            rf"variance in \[{NUM}, {NUM}\]", out)
        assert count == sets and count * per_set == n * c * 32 * 32, op
        assert max_mean < 1e-4 and 0.999 < var_lo <= var_hi < 1.0 + 1e-4, op


def test_tf_idioms(tmp_path):
    out = run_example("tf_idioms.py", tmp_path)
    assert_png(tmp_path / "tf_idioms.png")
    (train_diff,) = numbers(rf"training: max \|batch_normalization - BatchNormalization\| = {NUM}", out)
    (update_diff,) = numbers(rf"over 20 calls: max \|difference\| = {NUM}", out)
    (infer_diff,) = numbers(rf"inference: max \|.*?\| = {NUM}", out)
    assert train_diff < 1e-5 and update_diff < 1e-5 and infer_diff < 1e-5
    calls = re.findall(r"call +(\d+): moving_mean \[([^\]]*)\]", out)
    assert [int(i) for i, _ in calls] == list(range(1, 21))  # printed after every training call
    first = [float(v) for v in calls[0][1].split()]
    last = [float(v) for v in calls[-1][1].split()]
    assert first != last and all(f != 0.0 for f in first)  # they moved on the first call and kept moving


def test_torch_cnn_trains_both_models_alike():
    """examples/torch_cnn.py --quick: the torch.nn model and the converted one start from the same weights and
    train alike (the same losses to float32 rounding), and the loss goes down."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "torch_cnn.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    losses = {name: (float(a), float(b)) for name, a, b in
              re.findall(r"^\s+(torch\.nn|normkit)\s+median step .* loss ([\d.]+) -> ([\d.]+)$", proc.stdout, re.M)}
    assert set(losses) == {"torch.nn", "normkit"}, proc.stdout
    assert losses["normkit"][0] == pytest.approx(losses["torch.nn"][0], rel=1e-5)
    assert losses["normkit"][1] == pytest.approx(losses["torch.nn"][1], rel=1e-3)
    assert losses["normkit"][1] < losses["normkit"][0]


def test_readme_lists_every_example_with_its_figure():
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = re.search(r"^## Examples\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
    scripts = set(re.findall(r"python (examples/\w+\.py)", section))
    assert {f"examples/{p.name}" for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} <= scripts
    for script in scripts:
        assert (EXAMPLES.parent / script).is_file(), script
    for figure in re.findall(r"\]\((examples/figures/[\w.-]+\.png)\)", section):
        assert_png(EXAMPLES.parent / figure)
        assert (EXAMPLES.parent / figure).stat().st_size < 150_000, figure
