import sys
from pathlib import Path

import petsc4py

petsc4py.init([])

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))       # helpers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # deepcd_petsc

from helpers import HAVE_MPIEXEC  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "mpi: runs mpiexec (skipped when it is not on PATH)")


def pytest_collection_modifyitems(config, items):
    if HAVE_MPIEXEC:
        return
    skip = pytest.mark.skip(reason="mpiexec not found on PATH")
    for item in items:
        if "mpi" in item.keywords:
            item.add_marker(skip)
