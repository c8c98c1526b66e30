import os

import pytest
import torch


def cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker a core, at most four (each holds its own PyTorch and test models)."""
    return max(1, min(4, cores()))


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: each PyTorch (and every notebook kernel or command a
    test starts, through OMP_NUM_THREADS) gets its share instead of all of them, since OpenMP teams that
    together ask for more threads than there are cores stop spinning and run several times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, cores() // int(workers))
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # fewer asked for: keep it
            threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global random state."""
    torch.manual_seed(0)
