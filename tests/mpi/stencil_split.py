"""Run under mpiexec: each rank's 7-point stencil of a split operator
equals the serial one, read from AIJ rows and by probing a MATSHELL.

    mpiexec -n 3 python tests/mpi/stencil_split.py

For each case (scene, grid, DMDA process grid) every rank reads its block
with stencil.from_aij, checks it against MatMult on a ghosted random vector
(DMDA ghosts, the opposite side on periodic axes), probes a MATSHELL that
applies A (periodic lengths off multiples of 7 included: their seams are
read again), and rank 0 compares the gathered blocks with the stencil of
the same scene built on PETSc.COMM_SELF. Every case also checks that the
rows read in one C pass (stencil.read_aij) give the NumPy reading's
stencil and geometry (geometry_from_operator) bit for bit; so do PETSc's
ex45 (Dirichlet rows kept) on each split, and an operator with one
coupling beyond the 7 points between cells of different ranks (the same
SetupError on the rank owning that row). Rank 0 prints one line per case,
    CASE <scene> <nx>x<ny>x<nz> <px>x<py>x<pz> probe|noprobe <C|numpy>
and "OK <ranks>" when everything passed (exit 0), else "FAILED ..." (exit 1).
"""
import os
import sys
import traceback

from mpisetup import PETSc, comm, mpi, rank, size  # noqa: E402,F401
import numpy as np  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from helpers import ex45_system  # noqa: E402
from deepcd_petsc import stencil  # noqa: E402
from deepcd_petsc.context import geometry_from_operator  # noqa: E402
from deepcd_petsc.errors import SetupError  # noqa: E402
from deepcd_petsc.problem import Problem  # noqa: E402


class Shell:
    def __init__(self, A):
        self.A = A

    def mult(self, mat, x, y):
        self.A.mult(x, y)


def local_shape(da):
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    return (ze - zs, ye - ys, xe - xs)


def ghosted(da, x, local):
    gx = da.createLocalVec()
    da.globalToLocal(x, gx)
    (gxs, gys, gzs), (gxm, gym, gzm) = da.getGhostCorners()
    (xs, _), (ys, _), (zs, _) = da.getRanges()
    g = np.pad(gx.getArray(readonly=True).reshape(gzm, gym, gxm).copy(), 1)
    gx.destroy()
    return g[tuple(slice(o, o + n + 2) for o, n in zip((zs - gzs, ys - gys, xs - gxs), local))]


def check(cond, what):
    """Collective: fails on every rank when it fails on any."""
    bad = mpi.allgather(None if cond else f"rank {rank}: {what}")
    bad = [b for b in bad if b]
    if bad:
        raise AssertionError("; ".join(bad))


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def c_equals_numpy(da, A, what):
    """The C pass's stencil and geometry equal NumPy's bit for bit on
    every rank (collective); returns whether the C pass ran."""
    local = local_shape(da)
    used = stencil.read_aij(da, A, local) is not None
    try:
        c = stencil.from_aij(da, A, local)
    except SetupError as e:
        c = str(e)
    try:
        n = stencil.from_aij(da, A, local, kernels=False)
    except SetupError as e:
        n = str(e)
    if isinstance(c, str) or isinstance(n, str):
        check(c == n, f"{what}: C path {c!r} != NumPy {n!r}")
    else:
        check(same_bits(c.diag, n.diag) and same_bits(c.coef, n.coef)
              and c.periodic == n.periodic, f"{what}: the C stencil differs from NumPy's")
    gc = geometry_from_operator(da, A, local, with_rows=True)
    gn = geometry_from_operator(da, A, local, with_rows=True, kernels=False)
    check(all(same_bits(a, b) for a, b in zip(gc[:3], gn[:3])) and gc[3] == gn[3],
          f"{what}: the C geometry differs from NumPy's")
    return used, gc


def run_case(scene, shape, procs):
    p = Problem.from_scene(scene, shape, seed=5, proc_sizes=procs)
    local = local_shape(p.da)
    used, _ = c_equals_numpy(p.da, p.A, f"{scene} {procs}")
    st = stencil.from_aij(p.da, p.A, local)
    check(st.periodic == ((False, True, True) if scene == "periodic" else (False,) * 3), "periodic")
    # A x = stencil x on the block, for a random x
    x = p.da.createGlobalVec()
    y = x.duplicate()
    with x as xa:
        xa[...] = np.random.default_rng([rank, 11]).standard_normal(x.getLocalSize())
    p.A.mult(x, y)
    ref = y.getArray(readonly=True).reshape(local)
    err = np.abs(st.apply(ghosted(p.da, x, local)) - ref).max(initial=0.0)
    scale = mpi.allreduce(np.abs(ref).max(initial=0.0), op=mpi_max())
    check(err <= 1e-12 * scale, f"apply differs from MatMult by {err:.3e} (scale {scale:.3e})")
    x.destroy()
    y.destroy()
    # probing a MATSHELL equals the AIJ rows
    # (periodic lengths off multiples of 7 are read again with the seam moved)
    M = PETSc.Mat().createPython(p.A.getSizes(), Shell(p.A), comm=p.A.getComm())
    M.setUp()
    pr = stencil.probe(p.da, M, local)
    cmax = mpi.allreduce(np.abs(st.coef).max(initial=0.0), op=mpi_max())
    d = max(np.abs(pr.diag - st.diag).max(initial=0.0), np.abs(pr.coef - st.coef).max(initial=0.0))
    d = mpi.allreduce(d, op=mpi_max())
    check(d <= 1e-12 * cmax, f"probe differs from from_aij by {d:.3e}")
    M.destroy()
    # gathered blocks = the serial stencil
    blocks = mpi.gather((p.box, st.diag, st.coef), root=0)
    ok, why = True, ""
    if rank == 0:
        q = Problem.from_scene(scene, shape, seed=5, comm=PETSc.COMM_SELF)
        ser = stencil.from_aij(q.da, q.A, local_shape(q.da))
        cover = np.zeros(ser.shape, int)
        for r, ((xs, xe), (ys, ye), (zs, ze)), diag, coef in zip(range(size), *zip(*blocks)):
            sl = (slice(zs, ze), slice(ys, ye), slice(xs, xe))
            cover[sl] += 1
            if not (np.array_equal(diag, ser.diag[sl]) and np.array_equal(coef, ser.coef[(slice(None),) + sl])):
                ok, why = False, f"rank {r}'s block {sl} differs from the serial stencil"
        if not (cover == 1).all():
            ok, why = False, "the blocks do not cover the grid once"
        q.A.destroy()
        q.da.destroy()
    check(mpi.bcast((ok, why), root=0)[0], mpi.bcast(why, root=0))
    da_procs = p.da.getProcSizes()
    p.A.destroy()
    p.da.destroy()
    return da_procs, True, used


def run_ex45(n):
    """PETSc's ex45 (Dirichlet rows kept, a STAR DMDA): C = NumPy, and the
    kept rows are found (some rank has rows to solve by their diagonal)."""
    da, A, b = ex45_system(n, comm)
    used, g = c_equals_numpy(da, A, f"ex45 {n}")
    check(mpi.allreduce(int(g[2].sum())) > 0, "ex45: no kept Dirichlet rows found")
    procs = da.getProcSizes()
    for o in (A, b, da):
        o.destroy()
    return procs, used


def run_beyond_7_point(shape):
    """One coupling from the first cell (rank 0) to the last (the last
    rank): the rank owning the row raises the same SetupError on both
    paths, naming that row and column; geometry still equal."""
    p = Problem.from_scene("density", shape, seed=5)
    A = p.A
    A.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, False)
    last = int(np.prod(shape)) - 1
    lo, hi = A.getOwnershipRange()
    if lo <= 0 < hi:
        A.setValue(0, last, -0.5, addv=PETSc.InsertMode.INSERT_VALUES)
    A.assemble()
    used, _ = c_equals_numpy(p.da, A, "beyond 7 points")
    try:
        stencil.from_aij(p.da, A, local_shape(p.da))
        raised = ""
    except SetupError as e:
        raised = str(e)
    want = f"row 0 couples to column {last} " if lo <= 0 < hi else ""
    check(want in raised and (want or not raised), f"beyond 7 points: {raised!r}")
    procs = p.da.getProcSizes()
    A.destroy()
    p.da.destroy()
    return procs, used


def mpi_max():
    from mpi4py import MPI
    return MPI.MAX


CASES = [("density", (13, 11, 9)), ("periodic", (14, 14, 9)), ("periodic", (13, 11, 9))]
SPLITS = [None, (size, 1, 1), (1, size, 1), (1, 1, size)]


def main():
    def line(name, shape, procs, probed, used):
        if rank == 0:
            print(f"CASE {name} {'x'.join(map(str, shape))} {'x'.join(map(str, procs))} "
                  f"{'probe' if probed else 'noprobe'} {'C' if used else 'numpy'}", flush=True)
    for scene, shape in CASES:
        for procs in SPLITS:
            da_procs, probed, used = run_case(scene, shape, procs)
            if procs is not None:
                check(tuple(da_procs) == procs, f"DMDA process grid {da_procs} != {procs}")
            line(scene, shape, da_procs, probed, used)
    n = 9
    procs, used = run_ex45(n)
    line("ex45", (n, n, n), procs, False, used)
    shape = (7, 6, 9)
    procs, used = run_beyond_7_point(shape)
    line("beyond-7-point", shape, procs, False, used)
    if rank == 0:
        print(f"OK {size}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        if rank == 0:
            print("FAILED " + traceback.format_exc().strip().splitlines()[-1], flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        mpi.Abort(1)
