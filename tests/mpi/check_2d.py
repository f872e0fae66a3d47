"""DCDM on a 2D DMDA (5-point operator), serially or under mpiexec:

    mpiexec -n 3 python tests/mpi/check_2d.py NX NY OUT.npz [options]

options: --periodic x|y|xy (periodic DMDA axes; the others Dirichlet),
--jump (coefficient jumps ×100 in 5×5-cell patches), --shell (the operator
as a matrix-free MATPYTHON: probed), --pc (FCG with the NetworkPC instead
of the DCDM KSP). The operator is −div(k grad p), cell-centred, Dirichlet
walls eliminated into the diagonal, on PETSc's own 2D split. Rank 0 writes
OUT.npz: iterations, reason, the true relative residual, and f(b) (the
network's output for the right-hand side) and x in natural (j, i) order,
so that a test compares them across rank counts.
"""
import argparse
import sys

from mpisetup import PETSc, comm, rank, size  # noqa: E402,F401
import numpy as np  # noqa: E402

import deepcd_petsc  # noqa: E402
from deepcd_petsc.petsc_compat import set_dm_inactive  # noqa: E402


def coefficient(nx, ny, jump):
    k = np.ones((ny, nx))
    if jump:
        j, i = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        k[((i // 5) + 2 * (j // 5)) % 3 == 0] = 100.0
    return k


def assemble(da, k, periodic):
    """The local rows of −div(k grad p) (harmonic face k) on the DMDA."""
    nx, ny = da.getSizes()
    (xs, xe), (ys, ye) = da.getRanges()
    A = da.createMat()
    A.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, False)
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    for j in range(ys, ye):
        for i in range(xs, xe):
            row.index = (i, j)
            d = 0.0
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ii, jj = i + di, j + dj
                wrap = (("x" in periodic) if di else ("y" in periodic))
                inside = 0 <= ii < nx and 0 <= jj < ny
                if not inside and not wrap:
                    d += 2 * k[j, i]          # Dirichlet wall half a cell away
                    continue
                kn = k[jj % ny, ii % nx]
                t = 2 * k[j, i] * kn / (k[j, i] + kn)
                col.index = (ii, jj)       # across a periodic wall: its ghost index
                A.setValueStencil(row, col, -t, addv=PETSc.InsertMode.ADD_VALUES)
                d += t
            col.index = (i, j)
            A.setValueStencil(row, col, d, addv=PETSc.InsertMode.ADD_VALUES)
    A.assemble()
    return A


class Shell:
    """A matrix-free operator: y = A x through the assembled A."""

    def __init__(self, A):
        self.A = A

    def mult(self, mat, x, y):
        self.A.mult(x, y)


def natural(da, vec):
    """The whole field (ny, nx) on rank 0."""
    nat = da.createNaturalVec()
    da.globalToNatural(vec, nat)
    scatter, seq = PETSc.Scatter.toZero(nat)
    scatter.scatter(nat, seq, PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)
    nx, ny = da.getSizes()
    out = seq.getArray(readonly=True).reshape(ny, nx).copy() if rank == 0 else None
    for o in (nat, scatter, seq):
        o.destroy()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("nx", type=int)
    p.add_argument("ny", type=int)
    p.add_argument("out")
    p.add_argument("--periodic", default="")
    p.add_argument("--jump", action="store_true")
    p.add_argument("--shell", action="store_true")
    p.add_argument("--pc", action="store_true")
    a = p.parse_args()
    BT = PETSc.DM.BoundaryType
    bt = tuple(BT.PERIODIC if ax in a.periodic else BT.NONE for ax in "xy")
    da = PETSc.DMDA().create(dim=2, sizes=(a.nx, a.ny), dof=1, stencil_width=1,
                             boundary_type=bt, stencil_type=PETSc.DMDA.StencilType.STAR,
                             comm=comm)
    A = assemble(da, coefficient(a.nx, a.ny, a.jump), a.periodic)
    op = A
    if a.shell:
        op = PETSc.Mat().createPython(A.getSizes(), Shell(A), comm=comm)
        op.setUp()
    b = da.createGlobalVec()
    (xs, xe), (ys, ye) = da.getRanges()
    j, i = np.meshgrid(np.arange(ys, ye), np.arange(xs, xe), indexing="ij")
    with b as ba:
        ba[...] = (np.sin(0.37 * i + 1.3 * np.cos(0.21 * j)) + 0.1 * ((i * 7 + j * 3) % 5)).ravel()
    if set(a.periodic) >= {"x", "y"}:
        # no wall: singular, the constants are the null space
        ns = PETSc.NullSpace().create(constant=True, comm=comm)
        A.setNullSpace(ns)
        ns.remove(b)
        ns.destroy()
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(op)
    ksp.setDM(da)
    set_dm_inactive(ksp)
    if a.pc:
        ksp.setType("fcg")
        ksp.getPC().setType("python")
        ksp.getPC().setPythonContext(deepcd_petsc.NetworkPC())
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    else:
        ksp.setType("python")
        ksp.setPythonContext(deepcd_petsc.DCDM())
    ksp.setTolerances(rtol=1e-6, max_it=500)
    ksp.setFromOptions()
    x = b.duplicate()
    x.set(0.0)
    ksp.solve(b, x)
    r = b.duplicate()
    A.mult(x, r)
    r.aypx(-1.0, b)
    ctx = ksp.getPC().getPythonContext() if a.pc else ksp.getPythonContext()
    fb = b.duplicate()
    ctx.apply_network(b, fb, 1.0)
    res = dict(iterations=ksp.getIterationNumber(), reason=int(ksp.getConvergedReason()),
               true_residual=r.norm() / b.norm(), path=ctx.operator_path,
               grid=ctx.grid_source)
    fbn, xn = natural(da, fb), natural(da, x)
    if rank == 0:
        np.savez(a.out, fb=fbn, x=xn, **{k: np.array(v) for k, v in res.items()})
        print(res, flush=True)
    ksp.destroy()
    for o in (A, op, b, x, r, fb, da):
        o.destroy()


if __name__ == "__main__":
    sys.exit(main())
