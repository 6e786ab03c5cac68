"""normkit-aten: installed as a plugin, it is listed, dispatched to, and passes normkit's conformance kit."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib import metadata

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
import normkit.testing


def test_passes_the_conformance_kit():
    normkit.testing.assert_backend_conforms("aten")


def test_declared_by_entry_point_and_listed():
    (ep,) = [ep for ep in metadata.entry_points(group="normkit.backends") if ep.name == "aten"]
    assert ep.value == "normkit_aten:backend"
    row = {r.name: r for r in normkit.list_backends()}["aten"]
    assert (row.status, row.package, row.builtin) == ("ok", "normkit-aten", False)
    assert row.info["torch"] == torch.__version__
    assert len(row.implements) == 24  # 12 (op, direction) pairs x 2 dtypes


def test_declaration_does_not_import_torch():
    code = (
        "import json, sys, normkit, normkit_aten\n"
        "rows = {r.name: r.status for r in normkit.list_backends(load=False)}\n"
        "print(json.dumps([rows['aten'], 'torch' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["not loaded", False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frontend_dispatches_to_aten_and_matches_torch(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 5, 3)).astype(dtype)
    w, b = rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    gn = normkit.get("gn")
    y, saved = gn.forward(x, 3, w, b, backend="aten")
    assert saved.backend == "aten"
    xt = torch.from_numpy(x).requires_grad_()
    yt = F.group_norm(xt, 3, torch.from_numpy(w), torch.from_numpy(b))
    # the same aten kernel on the same memory: identical bits
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(gn(x, num_groups=3, weight=w, bias=b, backend="aten"), y)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dw, db = gn.backward(dy, x, saved, 3, w, b, backend="aten")
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_batchnorm_running_statistics_through_aten():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    bn = normkit.get("bn")
    y, saved = bn.forward(x, rm, rv, training=True, backend="aten")
    ref = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = F.batch_norm(torch.from_numpy(x), *ref, training=True)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, ref[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, ref[1].numpy(), rtol=1e-12)
    y_eval, _ = bn.forward(x, rm, rv, training=False, backend="aten")
    np.testing.assert_allclose(y_eval, F.batch_norm(torch.from_numpy(x), *ref).numpy(), rtol=1e-12, atol=1e-12)


def test_read_only_input_is_fine_and_untouched():
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "non-writable array" warning would be noise for the user
        y = normkit.get("ln")(x, 16, backend="aten")
    assert y.shape == x.shape and np.isfinite(y).all()


def test_normkit_thread_count_leaves_torchs_alone(monkeypatch):
    """aten's kernels run on torch's thread count, the user's: loading the plugin, or setting normkit's count,
    never changes it (it did, through the plugin's set_num_threads)."""
    monkeypatch.setattr(normkit.registry, "_num_threads", None)  # restored afterwards: the default again
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        normkit.registry.lookup("layernorm", "forward", "float32", backend="aten")
        normkit.set_num_threads(2)
        assert torch.get_num_threads() == 1
        assert normkit.get("ln")(np.ones((2, 8), np.float32), 8, backend="aten").shape == (2, 8)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
