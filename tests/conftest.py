"""Test hygiene for every test file: seeding, RNG isolation, poisoned kernel outputs, CUDA skips.

The Triton interpreter is switched on here, before anything imports triton, when no GPU is visible:
then ``backend="triton"`` runs the kernels on CPU tensors (slowly: keep those shapes small).
"""

import os
import random

import numpy as np
import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_restore_rng():
    """Every test starts from seed 0 and leaves the global RNG states as it found them."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(torch_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Kernel outputs start as NaN, so a kernel that skips part of its output cannot pass."""
    from srdiff.kernels import utils

    monkeypatch.setattr(utils, "POISON_ALLOCATIONS", True)
    yield


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    yield
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
