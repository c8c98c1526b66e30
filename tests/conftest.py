import os

import pytest
import torch


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker a core, at most four (each holds its own PyTorch and test models)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: each PyTorch (and every notebook kernel or command a
    test starts, through OMP_NUM_THREADS) gets its share instead of all of them, since OpenMP teams that
    together ask for more threads than there are cores stop spinning and run several times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global random state."""
    torch.manual_seed(0)
