"""Run under mpiexec: per-rank set-up equals the serial one.

    mpiexec -n 8 python tests/mpi/check_local.py

Prints "OK <nranks>" on rank 0 and exits 0 when every check passed:
labels   label_regions (distributed) partitions the fluid cells exactly as
         scipy.ndimage.label of the whole grid does, and finds the same
         closed regions, on grids whose regions cross every rank boundary
         (random fluid above and near the percolation threshold, a channel
         winding through every block, several splits); deepcd simulate's
         operator gets one null vector per closed region, each in A's null
         space;
flags    DCDM with set_flags given this rank's block, a global Vec, or the
         whole grid: the same iterations and the same solution; a block of
         the wrong shape on one rank, or a Vec of another grid, fails on
         every rank with one line naming it;
stencil  set_stencil (this rank's block, the whole grid, a dof-7 Vec) gives
         the solve that reading the assembled operator gives.
"""
import sys
import traceback

from mpisetup import PETSc, comm, finish, mpi, rank, size  # noqa: E402,F401
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402
from scipy import ndimage  # noqa: E402

from deepcd_petsc.context import set_flags, set_stencil  # noqa: E402
from deepcd_petsc.errors import error_message  # noqa: E402
from deepcd_petsc.petsc_compat import set_dm_inactive  # noqa: E402
from deepcd_petsc.problem import Problem, closed_regions, label_regions  # noqa: E402
from deepcd_petsc.scenes import FLUID, SOLID, make_flags  # noqa: E402

SHAPE = (13, 11, 12)     # (nx, ny, nz)


def random_flags(p_fluid, seed):
    nx, ny, nz = SHAPE
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([FLUID, SOLID, 2], np.int8), size=(nz, ny, nx),
                      p=[p_fluid, (1 - p_fluid) * 0.9, (1 - p_fluid) * 0.1])


def channel_flags():
    """One fluid channel zig-zagging along x in every y row, from row to
    row, and from z layer to layer: it crosses each block face many times."""
    nx, ny, nz = SHAPE
    f = np.full((nz, ny, nx), SOLID, np.int8)
    for k in range(0, nz, 2):
        for j in range(0, ny, 2):
            f[k, j, :] = FLUID
            if j + 2 < ny:
                f[k, j + 1, (nx - 1) if (j // 2) % 2 == 0 else 0] = FLUID
        if k + 2 < nz:
            f[k + 1, ny - 1 if ny % 2 else ny - 2, 0] = FLUID
    f[nz - 1, 1, 3:7] = FLUID     # and a closed pocket on top of solid cells
    return f


def check_labels():
    cases = []
    for seed in (1, 2):
        cases.append((random_flags(0.62, seed), set()))
        cases.append((random_flags(0.40, seed), {"x-"}))
    cases.append((channel_flags(), set()))
    cases.append((channel_flags(), {"y+"}))
    splits = [None, (size, 1, 1), (1, 1, size)]
    if size == 8:
        splits.append((2, 2, 2))
    out = []
    for flags, faces in cases:
        for procs in splits:
            p = Problem(flags, faces, comm=comm, proc_sizes=procs)
            try:
                keys, closed, counts = label_regions(p.da, p.pflags)
                v = p.da.createGlobalVec()
                with v as a:
                    a[...] = keys.ravel()
                whole = p.to_natural(v)
                v.destroy()
                assert p.closed_regions == len(closed)
                if rank == 0:
                    lab, n = ndimage.label(flags == FLUID)
                    fl = flags == FLUID
                    assert np.isnan(whole[~fl]).all()
                    # the same partition: one key per serial label and back
                    pairs = np.unique(np.stack([lab[fl], whole[fl]]), axis=1)
                    assert pairs.shape[1] == n == len(np.unique(whole[fl])), \
                        (pairs.shape, n, len(np.unique(whole[fl])))
                    _, sclosed = closed_regions(flags, faces)
                    dclosed = sorted(int(lab[fl][whole[fl] == k][0]) for k in closed)
                    assert dclosed == sorted(sclosed.tolist()), (dclosed, sclosed)
                    assert list(counts) == [int((whole == k).sum()) for k in closed]
                    # regions that cross rank boundaries: the test means something
                    out.append(n)
            finally:
                p.destroy()
    # deepcd simulate's pressure operator: the same closed regions, each
    # constant in A's null space
    from deepcd_petsc.simulate_grid import Grid
    for flags, faces in cases:
        g = Grid(SHAPE, 1.0, comm)
        A, ns = g.operator(flags, faces)
        try:
            vecs = [] if ns is None else ns.getVecs()
            assert len(vecs) == len(closed_regions(flags, faces)[1]), (len(vecs),)
            r = A.createVecLeft()
            for v in vecs:
                A.mult(v, r)
                assert r.norm() <= 1e-12 and abs(v.norm() - 1) <= 1e-12, (r.norm(), v.norm())
            r.destroy()
        finally:
            A.destroy()
            if ns is not None:
                ns.destroy()
            g.destroy()
    return f"labels: {len(cases)} grids x {len(splits)} splits, regions {out[:4]}..."


DCDM = {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM",
        "ksp_rtol": "1e-6", "ksp_max_it": "200", "ksp_dcdm_threads": "1"}


def dcdm(p, give=None):
    """DCDM on p with the DMDA attached; give(ksp) hands it the geometry.
    (iterations, solution in natural order on rank 0, geometry source)."""
    from deepcd_petsc.solvers import clear_options, set_options
    set_options("loc_", DCDM)
    ksp = PETSc.KSP().create(comm)
    x = p.b.duplicate()
    try:
        ksp.setOptionsPrefix("loc_")
        ksp.setOperators(p.A)
        ksp.setDM(p.da)
        set_dm_inactive(ksp)
        ksp.setFromOptions()
        if give is not None:
            assert give(ksp) == 1
        x.set(0.0)
        ksp.solve(p.b, x)
        assert ksp.getConvergedReason() > 0, ksp.getConvergedReason()
        return (ksp.getIterationNumber(), p.to_natural(x),
                ksp.getPythonContext().geometry_source)
    finally:
        x.destroy()
        ksp.destroy()
        clear_options("loc_", DCDM)


def same(results):
    """Equal iterations and solutions (rank 0 compares)."""
    its = [r[0] for r in results]
    assert len(set(its)) == 1, its
    if rank == 0:
        ref = results[0][1]
        for r in results[1:]:
            err = np.abs(r[1] - ref).max() / np.abs(ref).max()
            assert err <= 1e-12, err
    return its[0]


def expect_error(p, give, words):
    try:
        dcdm(p, give)
    except Exception as e:      # noqa: BLE001 (PETSc wraps the SetupError)
        msg = error_message(e)
        assert words in msg and "\n" not in msg.strip(), msg
        return
    raise AssertionError(f"no error; expected one about {words!r}")


def check_flags():
    nx, ny, nz = 16, 16, 16
    p = Problem.from_scene("spheres", (nx, ny, nz), seed=3, comm=comm)
    try:
        whole, faces = make_flags("spheres", (nz, ny, nx), 3)

        def vec(ksp):
            v = p.da.createGlobalVec()
            with v as a:
                a[...] = p.local_flags.ravel()
            n = set_flags(ksp, v, faces)
            v.destroy()
            return n
        runs = [dcdm(p, lambda k: set_flags(k, whole, faces)),
                dcdm(p, lambda k: set_flags(k, p.local_flags, faces)),
                dcdm(p, vec)]
        assert [r[2] for r in runs] == ["set_flags (whole grid)", "set_flags (this rank's block)",
                                        "set_flags (global Vec)"], [r[2] for r in runs]
        its = same(runs)
        # errors: one rank's block of the wrong shape; a Vec of another grid
        bad = p.local_flags if rank != size - 1 else p.local_flags[:-1]
        expect_error(p, lambda k: set_flags(k, bad, faces), "neither the grid")
        other = PETSc.DMDA().create(dim=3, sizes=(nx, ny, nz - 1), stencil_width=1, comm=comm)
        v = other.createGlobalVec()
        v.set(0.0)
        expect_error(p, lambda k: set_flags(k, v, faces), "set_flags: the Vec has")
        v.destroy()
        other.destroy()
        # a bad value on one rank: set_flags itself fails, on every rank
        worse = p.local_flags.copy()
        if rank == 0:
            worse[0, 0, 0] = 7
        expect_error(p, lambda k: set_flags(k, worse, faces), "must be 0 (fluid)")
    finally:
        p.destroy()
    return f"flags: {its} iterations with each form"


def check_stencil():
    from deepcd_petsc.coefficients import family
    from deepcd_petsc.scenes import remove_isolated_fluid
    from deepcd_petsc.stencil import from_coefficients
    n = 16
    p = Problem.from_scene("perm", (n, n, n), seed=2, comm=comm)
    try:
        st = p.local_stencil().packed()
        f, faces, coef = family("perm", (n, n, n), 2)
        whole = from_coefficients(remove_isolated_fluid(f, faces), faces, coef).packed()

        def vec(ksp):
            da7 = PETSc.DMDA().create(dim=3, sizes=(n, n, n), dof=7, stencil_width=1,
                                      ownership_ranges=p.da.getOwnershipRanges(), comm=comm)
            v = da7.createGlobalVec()
            with v as a:
                a[...] = np.moveaxis(st, 0, -1).ravel()
            out = set_stencil(ksp, v)
            v.destroy()
            da7.destroy()
            return out
        runs = [dcdm(p), dcdm(p, lambda k: set_stencil(k, st)),
                dcdm(p, lambda k: set_stencil(k, whole)), dcdm(p, vec)]
        assert runs[0][2] == "derived from the operator", runs[0][2]
        assert runs[1][2] == "set_stencil (this rank's block)", runs[1][2]
        its = same(runs)
        expect_error(p, lambda k: set_stencil(k, st[:, :-1]), "set_stencil: an array of shape")
    finally:
        p.destroy()
    return f"stencil: {its} iterations with each form"


CHECKS = [check_labels, check_flags, check_stencil]


def main():
    failures = []
    for check in CHECKS:
        ok, msg = True, ""
        try:
            msg = check()
        except Exception:
            ok, msg = False, traceback.format_exc()
        if not mpi.allreduce(ok, op=MPI.LAND):
            failures.append(check.__name__)
            if not ok:
                sys.stderr.write(f"[rank {rank}] {check.__name__}:\n{msg}\n")
        elif rank == 0:
            print(msg, flush=True)
    return finish(failures, sep=", ")


if __name__ == "__main__":
    sys.exit(main())
