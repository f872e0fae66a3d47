"""Running a KSP on a Problem the way every entry point does (CLI, examples,
benchmarks): options under a prefix, set-up and solve timed separately, the
true residual checked independently of the KSP's own norm."""
import statistics
import time

from .errors import petsc_errors
from .petsc_compat import set_dm_inactive

# PETSc's classical solvers for SPD Poisson systems, as option sets.
# "icc" becomes block Jacobi with ICC(0) blocks in parallel.
BASELINES = {
    "cg": {"ksp_type": "cg", "pc_type": "none"},
    "cg+jacobi": {"ksp_type": "cg", "pc_type": "jacobi"},
    "cg+icc": {"ksp_type": "cg", "pc_type": "icc"},
    "cg+gamg": {"ksp_type": "cg", "pc_type": "gamg"},
    "cg+hypre": {"ksp_type": "cg", "pc_type": "hypre", "pc_hypre_type": "boomeramg"},
    "cg+mg": {"ksp_type": "cg", "pc_type": "mg", "pc_mg_galerkin": "both"},
}

# KSPs whose residual norm can be the true (unpreconditioned) one
_UNPREC_OK = {"cg", "pipecg", "cr", "pipecr", "fcg", "pipefcg", "gcr",
              "pipegcr", "fgmres", "richardson", "python", "chebyshev"}


def reason_name(reason):
    from petsc4py import PETSc
    for k, v in vars(PETSc.KSP.ConvergedReason).items():
        if v == reason and not k.startswith("_") and k != "ITERATING":
            return k
    return str(reason)


def baseline_unavailable(name, comm=None):
    """Why the named baseline cannot run with this PETSc build (its
    preconditioner was not configured in, e.g. hypre), or None."""
    from .petsc_compat import pc_type_available
    pc = BASELINES.get(name, {}).get("pc_type")
    if pc and not pc_type_available(pc, comm):
        from petsc4py import PETSc
        return (f"PETSc {'.'.join(map(str, PETSc.Sys.getVersion()))} here was built without "
                f"PC type {pc!r}")
    return None


def baseline_options(name, problem):
    """Options of a named baseline adapted to the problem and rank count."""
    opts = dict(BASELINES[name])
    size = problem.da.getComm().getSize()
    if opts.get("pc_type") == "icc" and size > 1:
        opts.update(pc_type="bjacobi", sub_pc_type="icc")
    if opts.get("pc_type") == "mg":
        opts["pc_mg_levels"] = str(mg_levels(problem))
    return opts


def mg_levels(problem, coarsest=4):
    """Levels for geometric multigrid: halve (Q0 coarsening) while every
    rank keeps at least 2 cells per direction and the grid stays >= coarsest."""
    levels = 1
    sizes = [list(l) for l in problem.layout.l]
    glob = list(problem.shape)
    while all(g % 2 == 0 and g // 2 >= coarsest for g in glob) and \
            all(all(s % 2 == 0 and s // 2 >= 2 for s in ls) for ls in sizes):
        glob = [g // 2 for g in glob]
        sizes = [[s // 2 for s in ls] for ls in sizes]
        levels += 1
    return levels


def set_options(prefix, opts):
    from petsc4py import PETSc
    o = PETSc.Options(prefix)
    for k, v in opts.items():
        o[k] = v


def clear_options(prefix, opts):
    from petsc4py import PETSc
    o = PETSc.Options(prefix)
    for k in opts:
        o.delValue(k)


def run_ksp(problem, prefix="", options=None, x0=None, keep=False, history=False, solves=1):
    """Solve problem.A x = problem.b with a KSP configured by the options
    database (plus `options` under `prefix`). Returns a result dict; with
    keep=True also the KSP and solution (caller destroys them). `solves`:
    solve that many times with the same KSP, as a time-stepping code does;
    solve_s is then the median and solve_times lists them all."""
    from petsc4py import PETSc
    options = options or {}
    set_options(prefix, options)
    comm = problem.da.getComm()
    ksp = PETSc.KSP().create(comm)
    ok = False
    try:
        ksp.setOptionsPrefix(prefix)
        ksp.setOperators(problem.A)
        ksp.setDM(problem.da)
        set_dm_inactive(ksp)     # A and b are the problem's; the DMDA describes the grid
        ksp.setType("cg")
        ksp.getPC().setType("jacobi")
        with petsc_errors("invalid solver options"):
            ksp.setFromOptions()
            if not PETSc.Options(prefix).hasName("ksp_norm_type") and \
                    ksp.getType() in _UNPREC_OK:
                ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
            if PETSc.KSP.Type.PYTHON in (ksp.getType(), ksp.getPC().getType()) \
                    and getattr(problem, "coefficients", None) is None:
                # flag scenes: the flags are exact; families: the network
                # reads the assembled operator's coefficients
                from .context import set_flags
                set_flags(ksp, problem.flags, problem.open_faces)
        times = []
        if history:
            ksp.setConvergenceHistory()
            ksp.setMonitor(lambda k, its, rn: times.append(time.perf_counter()))
        x = problem.b.duplicate()
        if x0 is not None:
            x0.copy(x)
            ksp.setInitialGuessNonzero(True)
        else:
            x.set(0.0)
        with petsc_errors("solver set-up failed"):
            comm.barrier()
            t0 = time.perf_counter()
            ksp.setUp()
            ksp.getPC().setUp()
            comm.barrier()
            t1 = time.perf_counter()
            setup_s = t1 - t0
        solve_times = []
        for k in range(max(solves, 1)):
            if k:
                x0.copy(x) if x0 is not None else x.set(0.0)
                comm.barrier()
                t1 = time.perf_counter()
            with petsc_errors("solve failed"):
                ksp.solve(problem.b, x)
                comm.barrier()
                t2 = time.perf_counter()
            solve_times.append(t2 - t1)
        reason = ksp.getConvergedReason()
        result = {
            "ksp_type": ksp.getType(),
            "pc_type": ksp.getPC().getType(),
            "iterations": ksp.getIterationNumber(),
            "reason": reason_name(reason),
            "converged": reason > 0,
            "true_residual": problem.true_residual(x),
            "setup_s": setup_s,
            "solve_s": statistics.median(solve_times),
            "solve_times": solve_times,
            "ranks": comm.getSize(),
        }
        if history:
            bn = problem.b.norm()
            result["history"] = [float(v) / bn for v in ksp.getConvergenceHistory()]
            result["times"] = [t - t1 for t in times]
        ok = True
        if keep:
            return result, ksp, x
        x.destroy()
        return result
    finally:
        # a Python-typed KSP left to the garbage collector crashes PETSc 3.18
        # at exit: destroy it whenever it is not handed to the caller
        if not (keep and ok):
            ksp.destroy()
        clear_options(prefix, options)
