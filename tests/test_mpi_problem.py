"""The parallel assembly equals the serial one (tests/mpi/check_matrix.py)."""
from pathlib import Path

import pytest

from helpers import run_mpi

SCRIPT = Path(__file__).resolve().parent / "mpi" / "check_matrix.py"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_parallel_matrix_equals_serial(n):
    r = run_mpi(n, [SCRIPT])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK {n}" in r.stdout.splitlines()
