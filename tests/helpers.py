"""Subprocess helpers for the tests: the CLI and MPI runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HAVE_MPIEXEC = shutil.which("mpiexec") is not None


def _env():
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    # keep PETSc from reading stray options of the developer's environment
    env.pop("PETSC_OPTIONS", None)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    return env


def run_mpi(n, args, timeout=300):
    """`mpiexec -n n --oversubscribe python *args` from the repository root."""
    cmd = ["mpiexec", "-n", str(n), "--oversubscribe", sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO)


def run_cli(args, timeout=300):
    """`python -m deepcd_petsc *args` from the repository root."""
    cmd = [sys.executable, "-m", "deepcd_petsc", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO)


def run_cli_mpi(n, args, timeout=300):
    return run_mpi(n, ["-m", "deepcd_petsc", *args], timeout=timeout)


def reference_matrix(flags, open_faces):
    """A from the rules, one cell at a time (an independent reference).

    flags (nz, ny, nx): 0 fluid, 1 solid, 2 air. Fluid row: diagonal = number
    of non-solid face neighbours (beyond the domain: solid, or air through
    an open face), -1 per fluid neighbour. Other rows: identity.
    """
    import scipy.sparse as sp
    FLUID, SOLID = 0, 1
    nz, ny, nx = flags.shape
    N = nx * ny * nz
    rows, cols, vals = [], [], []

    def nat(i, j, k):
        return i + nx * (j + ny * k)

    steps = {"x-": (-1, 0, 0), "x+": (1, 0, 0), "y-": (0, -1, 0),
             "y+": (0, 1, 0), "z-": (0, 0, -1), "z+": (0, 0, 1)}
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                r = nat(i, j, k)
                if flags[k, j, i] != FLUID:
                    rows.append(r); cols.append(r); vals.append(1.0)
                    continue
                diag = 0
                for face, (di, dj, dk) in steps.items():
                    ii, jj, kk = i + di, j + dj, k + dk
                    if 0 <= ii < nx and 0 <= jj < ny and 0 <= kk < nz:
                        f = flags[kk, jj, ii]
                        if f != SOLID:
                            diag += 1
                        if f == FLUID:
                            rows.append(r); cols.append(nat(ii, jj, kk)); vals.append(-1.0)
                    elif face in open_faces:
                        diag += 1  # air beyond an open face
                rows.append(r); cols.append(r); vals.append(float(diag))
    return sp.csr_matrix((vals, (rows, cols)), shape=(N, N))


def run_python(args, timeout=300):
    """`python *args` from the repository root, in the tests' environment
    (for checks that may crash the interpreter, kept out of pytest's)."""
    cmd = [sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO)


# a small network configuration for fast tests
TINY = {"channels": [4, 8, 8], "bottom_blocks": 1, "level_blocks": 1}


def ex45_system(n, comm=None):
    """PETSc's tutorial src/ksp/ksp/tutorials/ex45.c in petsc4py: Dirichlet
    rows kept in the system (diagonal only), interior rows scaled by the
    mesh size and coupled to them, a STAR-stencil DMDA. (da, A, b)."""
    from petsc4py import PETSc
    comm = comm or PETSc.COMM_SELF
    da = PETSc.DMDA().create([n, n, n], dof=1, stencil_width=1,
                             stencil_type=PETSc.DMDA.StencilType.STAR, comm=comm)
    h = 1.0 / (n - 1)
    A = da.createMat()          # DMDA.createMatrix is gone in petsc4py 3.26
    b = da.createGlobalVec()
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    # b's local block through `with` (restored with a new state, so PETSc
    # 3.26 keeps no stale norm; DMDA.getVecArray warns under numpy 2.4)
    with b as bflat:
        barr = bflat.reshape(ze - zs, ye - ys, xe - xs)
        for k in range(zs, ze):
            for j in range(ys, ye):
                for i in range(xs, xe):
                    row.index = (i, j, k)
                    if 0 in (i, j, k) or n - 1 in (i, j, k):
                        A.setValueStencil(row, row, 6 * h)
                        barr[k - zs, j - ys, i - xs] = 6 * h
                        continue
                    A.setValueStencil(row, row, 6 * h)
                    for di, dj, dk in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1),
                                       (0, 0, -1)):
                        col.index = (i + di, j + dj, k + dk)
                        A.setValueStencil(row, col, -h)
                    barr[k - zs, j - ys, i - xs] = h ** 3
    A.assemble()
    return da, A, b


def sigint_default():
    """preexec_fn for a child that a test interrupts: SIGINT back to its
    default. A shell's background job (`make test &`) starts with SIGINT
    ignored, Python then installs no KeyboardInterrupt handler, and the
    child would never see the test's Ctrl-C."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_own_operators(*args, ranks=0):
    """examples/own_operators.py ARGS (on `ranks` ranks with mpiexec):
    ({solver: {its, reason, rel}}, stdout); fails the test on a non-zero exit."""
    script = REPO / "examples" / "own_operators.py"
    if ranks:
        r = run_mpi(ranks, [script, *args])
    else:
        r = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                           text=True, timeout=300, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 3 and cells[1].isdigit():
            rows[cells[0]] = dict(its=int(cells[1]), reason=int(cells[2]), rel=float(cells[3]))
    return rows, r.stdout
