"""pytest configuration: hypothesis profile and fixtures. Helpers live in support.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "normkit",
    deadline=None,  # first calls JIT-compile
    max_examples=int(os.environ.get("NORMKIT_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("normkit")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
