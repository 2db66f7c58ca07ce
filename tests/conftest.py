"""Shared test setup: environment before any kernel import, and hypothesis profiles.

Strategies and helpers shared by test modules live in ``tests/testing_utils.py``.

TRITON_INTERPRET must be set before triton kernel modules are imported so CPU runs the Triton
kernels in the interpreter; OMP_NUM_THREADS=1 keeps compiled CPU code stable on small shared boxes.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not os.environ.get("OSCAR_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_per_module():
    # compiled entries of shared code objects (a test model's forward, transformers' forward) count toward
    # Dynamo's recompile limit across modules: each test module starts from a clean Dynamo
    torch._dynamo.reset()
    yield


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo before and after the test (for modules whose tests compile one shared forward many times:
    ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
