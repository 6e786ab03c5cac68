"""pytest configuration: hypothesis profile and fixtures. Helpers live in support.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import normkit
import normkit.reference
from normkit import registry
from normkit.contract import DIRECTIONS

# The kernels of both backends run small inputs (at most 32768 values) on one thread by default; here every input
# runs on every thread, so that the thread-count tests exercise the parallel schedules at small sizes too
# (subprocesses inherit it). tests/test_threads.py checks that both give the same bits.
os.environ.setdefault("NORMKIT_SERIAL_MAX_VALUES", "0")

settings.register_profile(
    "normkit",
    deadline=None,  # first calls JIT-compile
    max_examples=int(os.environ.get("NORMKIT_HYPOTHESIS_EXAMPLES", "25")),
    # The same examples on every run and every machine (seeded from each test), as in hypothesis' own "ci"
    # profile: a test suite that passes once passes again. NORMKIT_HYPOTHESIS_RANDOM=1 explores new examples.
    derandomize=os.environ.get("NORMKIT_HYPOTHESIS_RANDOM", "") in ("", "0"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("normkit")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def spy():
    """A backend named "spy": the reference kernels, recording every call (key and arguments)."""
    calls = []

    def wrap(key, kernel):
        def call(*args):
            calls.append((key, args))
            kernel(*args)

        return call

    kernels = {key: wrap(key, k) for key, k in normkit.reference.KERNELS.items()}
    normkit.register_backend(normkit.Backend(name="spy", module=registry.runtime_module(kernels), kernels=DIRECTIONS))
    yield calls
    normkit.unregister_backend("spy")
