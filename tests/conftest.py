"""Test setup shared by every test module.

Without CUDA, the Triton kernels run under Triton's interpreter on CPU tensors; the variable must be
set before triton is imported, which is why it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_filter_choice():
    """Every test starts with no record of earlier filtered backwards (cce_inductor.filter_choice
    keys them by the weight's address, which a later test's tensor may reuse)."""
    from cce_inductor import filter_choice

    filter_choice.reset()


@pytest.fixture(autouse=True)
def _seeded_global_generator():
    """Every test starts from the same state of torch's global generator (CPU and CUDA), so that a
    test's draws do not depend on which tests ran before it (a subset, another order, -x). Tests that
    need particular inputs use their own torch.Generator."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
