"""Run under mpiexec: the parallel matrix and right-hand side of every scene
and operator family equal the serial ones once mapped to natural ordering.

    mpiexec -n 3 python tests/mpi/check_matrix.py

Prints "OK <nranks>" on rank 0 and exits 0 when every case passed.
"""
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import petsc4py  # noqa: E402

petsc4py.init([])
from petsc4py import PETSc  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from deepcd_petsc.problem import Problem  # noqa: E402
from deepcd_petsc.scenes import FAMILY_SCENES  # noqa: E402

comm = PETSc.COMM_WORLD
mpi = comm.tompi4py()
rank, size = comm.getRank(), comm.getSize()

SCENES = ["box", "smoke", "spheres", "liquid", "file"]
SHAPES = [(9, 7, 11), (12, 12, 12)]
SEED = 5


def gathered_matrix(p):
    """The whole matrix in natural ordering on rank 0 (None elsewhere)."""
    rstart, rend = p.A.getOwnershipRange()
    indptr, cols, vals = p.A.getValuesCSR()
    nat_rows = p.layout.natural_index(np.arange(rstart, rend))
    rows = np.repeat(nat_rows, np.diff(indptr))
    nat_cols = p.layout.natural_index(cols)
    # Layout agrees with PETSc's own application ordering
    ao = p.da.getAO()
    assert np.array_equal(ao.petsc2app(np.arange(rstart, rend, dtype=PETSc.IntType)), nat_rows)
    parts = mpi.gather((rows, nat_cols, np.asarray(vals)), root=0)
    if rank != 0:
        return None
    N = int(np.prod(p.shape))
    r, c, v = (np.concatenate(x) for x in zip(*parts))
    assert len(r) == len(set(zip(r.tolist(), c.tolist()))), "duplicate entries"
    return sp.csr_matrix((v, (r, c)), shape=(N, N))


def serial_csr(A):
    indptr, cols, vals = A.getValuesCSR()
    N = A.getSize()[0]
    return sp.csr_matrix((vals, cols, indptr), shape=(N, N))


def check(scene, shape, flags_file, proc_sizes=None):
    kw = {"flags_file": flags_file} if scene == "file" else {}
    p = Problem.from_scene(scene, shape, seed=SEED, proc_sizes=proc_sizes, **kw)
    s = None
    try:
        M = gathered_matrix(p)
        b = p.to_natural(p.b)
        closed = p.closed_regions
        if rank == 0:
            s = Problem.from_scene(scene, shape, seed=SEED, comm=PETSc.COMM_SELF, **kw)
            S = serial_csr(s.A)
            D = (M - S).tocsr()
            D.eliminate_zeros()
            assert M.nnz == S.nnz, f"nnz {M.nnz} != {S.nnz}"
            assert D.nnz == 0, f"{D.nnz} matrix entries differ"
            sb = s.to_natural(s.b)
            nx, ny, nz = shape
            assert b.shape == sb.shape == (nz, ny, nx)
            err = np.linalg.norm(b - sb) / np.linalg.norm(sb)
            assert err <= 1e-12, f"rhs differs: relative error {err:.3e}"
            assert closed == s.closed_regions, f"closed regions {closed} != {s.closed_regions}"
    finally:
        p.destroy()
        if s is not None:
            s.destroy()


def main():
    tmp = None
    if rank == 0:
        tmp = tempfile.mkdtemp(prefix="deepcd_mpi_")
    tmp = mpi.bcast(tmp, root=0)
    failures = []
    cases = [(sc, sh, None) for sh in SHAPES for sc in SCENES]
    # operator families, each rank building its block (perm: normalised
    # by the maximum over all ranks)
    cases += [(fam, (12, 10, 12), None) for fam in FAMILY_SCENES]
    cases.append(("spheres", (12, 12, 12), (size, 1, 1)))
    cases.append(("liquid", (9, 7, 11), (1, 1, size)))
    try:
        for scene, shape, procs in cases:
            flags_file = None
            if scene == "file":
                nx, ny, nz = shape
                flags_file = os.path.join(tmp, f"flags_{nx}_{ny}_{nz}.npy")
                if rank == 0:
                    rng = np.random.default_rng(42)
                    np.save(flags_file, rng.choice(np.array([0, 1, 2], np.int8),
                                                   size=(nz, ny, nx), p=[0.6, 0.25, 0.15]))
                mpi.Barrier()
            ok, msg = True, ""
            try:
                check(scene, shape, flags_file, procs)
            except Exception:
                ok, msg = False, traceback.format_exc()
            ok = mpi.allreduce(ok, op=__import__("mpi4py").MPI.LAND)
            if not ok:
                failures.append(f"{scene} {shape} procs={procs}")
                if msg:
                    sys.stderr.write(f"[rank {rank}] {scene} {shape}:\n{msg}\n")
    finally:
        mpi.Barrier()
        if rank == 0:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        if rank == 0:
            print("FAILED " + "; ".join(failures))
        sys.stdout.flush()
        return 1
    if rank == 0:
        print(f"OK {size}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
