"""Common start of the scripts in tests/mpi (run as `mpiexec -n P python
tests/mpi/check_*.py`): repository on sys.path, PETSc initialised, one
torch/OpenMP thread per rank."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import petsc4py  # noqa: E402

petsc4py.init([])
from petsc4py import PETSc  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

comm = PETSc.COMM_WORLD
mpi = comm.tompi4py()
rank, size = comm.getRank(), comm.getSize()


def finish(failures, sep="; "):
    """Rank 0's last line, "OK <ranks>" or "FAILED <what failed>", and the
    exit code (the tests read that line)."""
    if rank == 0:
        print(f"FAILED {sep.join(failures)}" if failures else f"OK {size}", flush=True)
    sys.stdout.flush()
    return 1 if failures else 0
