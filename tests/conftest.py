import sys
from pathlib import Path

import petsc4py

petsc4py.init([])

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))       # helpers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # deepcd_petsc

from helpers import HAVE_MPIEXEC  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use one torch thread (2 cores, MPI tests beside)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "mpi: runs mpiexec (skipped when it is not on PATH)")


def pytest_collection_modifyitems(config, items):
    if HAVE_MPIEXEC:
        return
    skip = pytest.mark.skip(reason="mpiexec not found on PATH")
    for item in items:
        if "mpi" in item.keywords:
            item.add_marker(skip)
