import os

import pytest
import torch

# One intra-op thread per test process: results do not depend on the machine's core count, and
# pytest-xdist workers do not oversubscribe the CPU.
torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def shared_data_dir():
    path = os.environ.get("SPARSAM_SHARED_DATA", SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared data folder not found at {os.path.abspath(path)} (set SPARSAM_SHARED_DATA)")
    return os.path.abspath(path)
