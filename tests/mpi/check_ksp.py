"""DCDM solves that need their own process (serially or under mpiexec).

    python tests/mpi/check_ksp.py shell
    mpiexec -n 2 python tests/mpi/check_ksp.py solid

Checks (each prints "OK <check> ..." on rank 0 when it passed, or
"FAIL <check>: <why>"; the exit code is 0 only when all passed):

shell  A matrix-free operator (a Python Mat whose mult calls the assembled
       A) with the DMDA attached and no set_flags: DCDM converges.
solid  A grid whose x < nx/2 half is solid, split along x so that rank 0's
       DMDA block (and its block of the network's decomposition) holds no
       fluid cell at all: DCDM converges with the serial iteration count
       (+-1), with set_flags and with the geometry derived from the operator.
"""
import sys
import traceback

from mpisetup import PETSc, comm, mpi, rank, size  # noqa: E402,F401
import numpy as np  # noqa: E402
from deepcd_petsc.petsc_compat import set_dm_inactive  # noqa: E402
from deepcd_petsc.problem import Problem  # noqa: E402
from deepcd_petsc.scenes import SOLID  # noqa: E402
from deepcd_petsc.solvers import clear_options, reason_name, run_ksp, set_options  # noqa: E402

DCDM = {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM",
        "ksp_rtol": "1e-6", "ksp_max_it": "2000"}


def say(text):
    if rank == 0:
        print(text, flush=True)


def solve_plain(A, problem, prefix, opts):
    """DCDM on operator A with problem.da attached and no set_flags:
    (reason, iterations, true residual, context)."""
    set_options(prefix, opts)
    ksp = PETSc.KSP().create(problem.da.getComm())
    x = problem.b.duplicate()
    try:
        ksp.setOptionsPrefix(prefix)
        ksp.setOperators(A)
        ksp.setDM(problem.da)
        set_dm_inactive(ksp)
        ksp.setFromOptions()
        x.set(0.0)
        ksp.solve(problem.b, x)
        ctx = ksp.getPythonContext()
        info = dict(geometry=ctx.geometry_source, fallbacks=ctx.fallbacks,
                    dec=None if ctx.evaluator.dec is None else ctx.evaluator.dec)
        return (reason_name(ksp.getConvergedReason()), ksp.getIterationNumber(),
                problem.true_residual(x), info)
    finally:
        x.destroy()
        ksp.destroy()
        clear_options(prefix, opts)


class Shell:
    def __init__(self, A):
        self.A = A
        self.calls = 0

    def mult(self, mat, x, y):
        self.calls += 1
        self.A.mult(x, y)


def check_shell():
    p = Problem.from_scene("spheres", (16, 16, 16), seed=3)
    ctx = Shell(p.A)
    S = PETSc.Mat().createPython(p.A.getSizes(), ctx, comm=comm)
    S.setUp()
    try:
        reason, its, res, info = solve_plain(S, p, "s_", DCDM)
    finally:
        S.destroy()
        p.destroy()
    assert reason == "CONVERGED_RTOL", (reason, its)
    assert res <= 1e-6, res
    assert ctx.calls >= its
    assert info["geometry"] == "derived from the operator", info
    return f"ranks={size} its={its}"


def solid_flags():
    nx, ny, nz = 32, 8, 8
    flags = np.zeros((nz, ny, nx), np.int8)
    flags[:, :, :nx // 2] = SOLID
    return flags, {"z+"}


def check_solid():
    flags, faces = solid_flags()
    par = Problem(flags, faces, comm=comm, proc_sizes=(size, 1, 1))
    out = []
    try:
        if size == 2:
            owned = par.local_flags
            if rank == 0:
                assert (owned == SOLID).all(), "rank 0's DMDA block should be all solid"
            else:
                assert (owned != SOLID).all()
        res_flags = run_ksp(par, "p_", DCDM)
        reason, its, tres, info = solve_plain(par.A, par, "q_", DCDM)
        dec = info["dec"]
        if size == 2:
            assert dec is not None and tuple(dec.procs) == (2, 1, 1), dec and dec.procs
            assert tuple(dec.block[0]) == ((0, 16) if rank == 0 else (16, 32)), dec.block
        par_its = (res_flags["iterations"], its)
        for r in (res_flags, {"reason": reason, "true_residual": tres}):
            assert r["reason"] == "CONVERGED_RTOL", r
            assert r["true_residual"] <= 1e-6, r
    finally:
        par.destroy()
    ser_its = None
    if rank == 0:
        ser = Problem(flags, faces, comm=PETSc.COMM_SELF)
        try:
            a = run_ksp(ser, "r_", DCDM)
            reason, its, tres, _ = solve_plain(ser.A, ser, "u_", DCDM)
            assert a["reason"] == reason == "CONVERGED_RTOL", (a, reason)
            ser_its = (a["iterations"], its)
        finally:
            ser.destroy()
    ser_its = mpi.bcast(ser_its, root=0)
    for name, pi, si in zip(("set_flags", "derived"), par_its, ser_its):
        assert abs(pi - si) <= 1, f"{name}: {pi} iterations on {size} ranks, {si} serially"
    out.append(f"ranks={size} its={par_its[0]},{par_its[1]} serial={ser_its[0]},{ser_its[1]}")
    return " ".join(out)


CHECKS = {"shell": check_shell, "solid": check_solid}


def main(names):
    bad = [n for n in names if n not in CHECKS]
    if bad or not names:
        say(f"usage: check_ksp.py {'|'.join(CHECKS)} ...")
        return 2
    failed = False
    for name in names:
        ok, msg = True, ""
        try:
            msg = CHECKS[name]()
        except Exception:
            ok, msg = False, traceback.format_exc()
        ok = mpi.allreduce(ok, op=__import__("mpi4py").MPI.LAND)
        if ok:
            say(f"OK {name} {msg}")
        else:
            failed = True
            if msg:
                sys.stderr.write(f"[rank {rank}] {name}:\n{msg}\n")
                sys.stderr.flush()
            say(f"FAIL {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
