"""examples/train_bn.py: the seeds' BN-on/off experiment runs in both frameworks, draws its figures, and shows the
seeds' claim (BN converges faster at the same learning rate, and tolerates a larger one) on fixed seeds."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_bn.py"
RESULT = re.compile(r"^RESULT framework=(\w+) bn=(on|off) lr=(\S+) acc=(\S+) loss=(\S+)$", re.M)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_train_bn_quick(framework, tmp_path):
    if framework == "torch":
        pytest.importorskip("torch")
    env = dict(os.environ, MPLBACKEND="Agg")  # the example fixes its own thread counts (--threads 1)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--framework", framework, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for kind in ("curves", "hist"):
        png = tmp_path / f"train_bn_{framework}_{kind}.png"
        data = png.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", png
    acc = {(bn, float(lr)): float(a) for fw, bn, lr, a, _ in RESULT.findall(proc.stdout) if fw == framework}
    assert len(acc) == 4, proc.stdout
    base, large = sorted({lr for _, lr in acc})
    # the seeds' claim: at the same learning rate BN is ahead after the same number of epochs ...
    assert acc[("on", base)] >= acc[("off", base)] + 0.05, proc.stdout
    assert acc[("on", base)] >= 0.85, proc.stdout
    # ... and with the larger learning rate BN still trains while the network without it does worse
    assert acc[("on", large)] >= 0.75, proc.stdout
    assert acc[("on", large)] >= acc[("off", large)] + 0.1, proc.stdout
