"""Island deflation on any number of ranks, on an operator assembled here
(not by the package): ellipsoidal light bubbles (k larger by --ratio),
harmonic face coefficients, a Dirichlet bottom, periodic x with a bubble
across the wrap. Prints one JSON line: the islands (sizes and smallest
natural index, in a split-independent order), E = ZᵀAZ in that order, the
largest |E − ZᵀAZ by MatMults| and |(AZ)ᵀd| after the projection (relative),
and DCDM's iterations."""
import json
import sys

from mpisetup import PETSc, comm, mpi  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from deepcd_petsc import islands  # noqa: E402
from deepcd_petsc.petsc_compat import set_dm_inactive  # noqa: E402
from deepcd_petsc.stencil import from_aij  # noqa: E402

def main():
    shape = tuple(int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "26,20,18").split(","))
    ratio = float(sys.argv[2]) if len(sys.argv) > 2 else 1e3
    nx, ny, nz = shape
    da = PETSc.DMDA().create(dim=3, sizes=shape, dof=1, stencil_width=1, comm=comm,
                             boundary_type=(PETSc.DM.BoundaryType.PERIODIC, PETSc.DM.BoundaryType.NONE,
                                            PETSc.DM.BoundaryType.NONE))
    z, y, x = np.meshgrid((np.arange(nz) + .5) / nz, (np.arange(ny) + .5) / ny,
                          (np.arange(nx) + .5) / nx, indexing="ij")
    inside = np.zeros((nz, ny, nx), bool)
    expected = []
    # (z, y, x) centres and radii; the first crosses the periodic x wrap
    for c, r in (((0.5, 0.5, 0.02), (0.25, 0.2, 0.15)), ((0.3, 0.3, 0.5), (0.2, 0.15, 0.2)),
                 ((0.75, 0.7, 0.55), (0.15, 0.2, 0.25))):
        dx = np.minimum(abs(x - c[2]), 1 - abs(x - c[2]))
        one = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + (dx / r[2]) ** 2 < 1
        expected.append(int(one.sum()))
        inside |= one
    k = np.where(inside, ratio, 1.0)
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    A = da.createMat()
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    for kk in range(zs, ze):
        for jj in range(ys, ye):
            for ii in range(xs, xe):
                row.index = (ii, jj, kk)
                kc, diag = k[kk, jj, ii], 0.0
                for di, dj, dk in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                    i2, j2, k2 = (ii + di) % nx, jj + dj, kk + dk
                    if 0 <= j2 < ny and 0 <= k2 < nz:
                        c = 2 * kc * k[k2, j2, i2] / (kc + k[k2, j2, i2])
                        col.index = (ii + di, j2, k2)   # unwrapped: PETSc wraps it
                        A.setValueStencil(row, col, -c)
                        diag += c
                    elif k2 < 0:
                        diag += 2 * kc
                col.index = (ii, jj, kk)
                A.setValueStencil(row, col, diag)
    A.assemble()

    local = (ze - zs, ye - ys, xe - xs)
    st = from_aij(da, A, local)
    isl = islands.find(da, st)
    defl = islands.Deflation(da, st, isl.labels, isl.count)
    n = isl.count
    # natural index of every local cell: the islands in a split-independent order
    kz, jy, ix = np.meshgrid(np.arange(zs, ze), np.arange(ys, ye), np.arange(xs, xe), indexing="ij")
    nat = (kz * ny + jy) * nx + ix
    lab = isl.labels
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, lab[lab >= 0], nat[lab >= 0])
    mpi.Allreduce(MPI.IN_PLACE, first, op=MPI.MIN)
    order = np.argsort(first)
    sizes = np.bincount(lab[lab >= 0], minlength=n).astype(np.int64)
    mpi.Allreduce(MPI.IN_PLACE, sizes, op=MPI.SUM)

    # E against MatMults with the indicator Vecs
    Z, AZ = [], []
    for i in range(n):
        v = da.createGlobalVec()
        with v as a:
            a[...] = (lab == i).ravel().astype(float)
        w = v.duplicate()
        A.mult(v, w)
        Z.append(v)
        AZ.append(w)
    E = defl.energy().numpy()
    err = max((abs(E[i, j] - Z[i].dot(AZ[j])) for i in range(n) for j in range(n)), default=0.0)
    err /= max(abs(E).max(), 1e-300)
    d = da.createGlobalVec()
    d.setRandom()
    with d as a:
        defl.project(torch.from_numpy(a))
    proj = max((abs(AZ[i].dot(d)) / (AZ[i].norm() * d.norm()) for i in range(n)), default=0.0)

    b = da.createGlobalVec()
    b.setRandom()
    xv = b.duplicate()
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(A)
    ksp.setDM(da)
    set_dm_inactive(ksp)
    opts = PETSc.Options()
    for key, val in {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM", "ksp_rtol": 1e-6,
                     "ksp_dcdm_threads": 1, "ksp_max_it": 300}.items():
        opts[key] = val
    ksp.setFromOptions()
    # the same right-hand side on every split: b's natural values
    with b as a:
        a[...] = np.sin(0.37 * nat.ravel()) + 0.1 * np.cos(1.3 * nat.ravel())
    ksp.solve(b, xv)
    res = b.duplicate()
    A.mult(xv, res)
    res.aypx(-1.0, b)
    out = {"count": n, "sizes": [int(sizes[i]) for i in order], "first": [int(first[i]) for i in order],
           "E": E[np.ix_(order, order)].tolist(), "expected_sizes": sorted(expected), "E_error": float(err), "projection": float(proj),
           "iterations": ksp.getIterationNumber(), "reason": int(ksp.getConvergedReason()),
           "true_residual": res.norm() / b.norm(), "ranks": comm.getSize()}
    if comm.getRank() == 0:
        print(json.dumps(out), flush=True)
    for obj in Z + AZ + [d, b, xv, res, ksp, A, da]:
        obj.destroy()


if __name__ == "__main__":
    main()
