"""Running a KSP on a Problem the way every entry point does (CLI, examples,
benchmarks): options under a prefix, set-up and solve timed separately, the
true residual checked independently of the KSP's own norm."""
import statistics
import time

from .errors import petsc_errors
from .petsc_compat import set_dm_inactive

# PETSc's classical solvers for SPD Poisson systems, as option sets.
# "icc" becomes block Jacobi with ICC(0) blocks in parallel. The "-tuned"
# sets are the defaults' fairest rivals: chosen on spheres 64³ from the
# settings tried in the README's "Tuned baselines" (issue 17).
_HYPRE = {"ksp_type": "cg", "pc_type": "hypre", "pc_hypre_type": "boomeramg"}
_CHEBY_JACOBI = {"mg_levels_ksp_type": "chebyshev", "mg_levels_pc_type": "jacobi"}
BASELINES = {
    "cg": {"ksp_type": "cg", "pc_type": "none"},
    "cg+jacobi": {"ksp_type": "cg", "pc_type": "jacobi"},
    "cg+icc": {"ksp_type": "cg", "pc_type": "icc"},
    "cg+gamg": {"ksp_type": "cg", "pc_type": "gamg"},
    "cg+hypre": dict(_HYPRE),
    "cg+mg": {"ksp_type": "cg", "pc_type": "mg", "pc_mg_galerkin": "both"},
    # hypre's 3D recommendation (HMIS, ext+i, aggressive coarsening on the
    # first level, P_max 4), threshold 0.25 measured faster than 0.5 here
    "cg+hypre-tuned": dict(_HYPRE, pc_hypre_boomeramg_coarsen_type="HMIS",
                           pc_hypre_boomeramg_interp_type="ext+i",
                           pc_hypre_boomeramg_strong_threshold="0.25",
                           pc_hypre_boomeramg_agg_nl="1", pc_hypre_boomeramg_P_max="4",
                           pc_hypre_boomeramg_relax_type_all="symmetric-SOR/Jacobi"),
    # aggressive coarsening on every level (its option name is per version:
    # gamg_aggressive()), a small threshold, a larger coarse grid
    "cg+gamg-tuned": dict({"ksp_type": "cg", "pc_type": "gamg", "pc_gamg_threshold": "0.01",
                           "pc_gamg_coarse_eq_limit": "1000"}, **_CHEBY_JACOBI),
    # PCMG on the DMDA (Q0 interpolation), Galerkin coarse operators,
    # Chebyshev/Jacobi smoothing, W-cycles (Q0 prolongation weakens V-cycles)
    "cg+mg-tuned": dict({"ksp_type": "cg", "pc_type": "mg", "pc_mg_galerkin": "both",
                         "pc_mg_cycle_type": "w"}, **_CHEBY_JACOBI),
}


def gamg_aggressive(version=None, levels=10):
    """GAMG's aggressive-coarsening option for this PETSc: the number of
    levels that square the graph was -pc_gamg_square_graph up to 3.18 and
    is -pc_gamg_aggressive_coarsening from 3.19."""
    if version is None:
        from petsc4py import PETSc
        version = PETSc.Sys.getVersion()
    key = "pc_gamg_square_graph" if tuple(version[:2]) <= (3, 18) else \
        "pc_gamg_aggressive_coarsening"
    return {key: str(levels)}


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
    if name == "cg+gamg-tuned":
        opts.update(gamg_aggressive())
    return opts


def mg_levels(problem, coarsest=4):
    """Levels for geometric multigrid: halve (Q0 coarsening) while every
    rank keeps at least 2 cells per direction and the grid stays >= coarsest."""
    levels = 1
    axes = [a for a, g in enumerate(problem.shape) if g > 1]      # 2D: not z
    sizes = [list(problem.layout.l[a]) for a in axes]
    glob = [problem.shape[a] for a in axes]
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


def create_ksp(problem, prefix=""):
    """A KSP on the problem's operator and grid, configured from the options
    database under `prefix` (CG + Jacobi unless the options say otherwise).
    The caller destroys it."""
    from petsc4py import PETSc
    ksp = PETSc.KSP().create(problem.da.getComm())
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
            give_flags(ksp, problem)
    except BaseException:
        ksp.destroy()
        raise
    return ksp


def give_flags(ksp, problem):
    """Flag scenes: hand the network the exact cell flags (families: the
    network reads the assembled operator's coefficients instead). Again for
    every new geometry: the network's set-up follows them, not A's values."""
    from petsc4py import PETSc
    if PETSc.KSP.Type.PYTHON in (ksp.getType(), ksp.getPC().getType()) \
            and getattr(problem, "coefficients", None) is None:
        from .context import set_flags
        set_flags(ksp, problem.local_flags, problem.open_faces)   # this rank's block


def _timed(comm, fn):
    """Seconds fn() takes on the slowest rank."""
    comm.barrier()
    t0 = time.perf_counter()
    fn()
    comm.barrier()
    return time.perf_counter() - t0


def setup_ksp(ksp):
    """Set up the KSP and PC for the current operator; a no-op when neither
    changed. A Python KSP (DCDM) is set up here too: PETSc calls its setUp
    only once, and DCDM would otherwise rebuild its network inside solve."""
    with petsc_errors("solver set-up failed"):
        ksp.setUp()
        ksp.getPC().setUp()
        if ksp.getType() == "python":
            ctx = ksp.getPythonContext()
            if hasattr(ctx, "setUp"):
                ctx.setUp(ksp)


def solve_ksp(ksp, b, x):
    with petsc_errors("solve failed"):
        ksp.solve(b, x)


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
    ksp = None
    ok = False
    try:
        ksp = create_ksp(problem, prefix)
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
        setup_s = _timed(comm, lambda: setup_ksp(ksp))
        t1 = time.perf_counter()
        solve_times = []
        for k in range(max(solves, 1)):
            if k:
                x0.copy(x) if x0 is not None else x.set(0.0)
                comm.barrier()
                t1 = time.perf_counter()
            solve_times.append(_timed(comm, lambda: solve_ksp(ksp, problem.b, x)))
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
        if ksp is not None and not (keep and ok):
            ksp.destroy()
        clear_options(prefix, options)


def pc_setups():
    """PCSetUp events so far in this process (nested PCs included): PETSc
    logs one only when a PC really sets up, not when it reuses its set-up."""
    from petsc4py import PETSc
    PETSc.Log.begin()        # idempotent; counts from the first call
    return PETSc.Log.Event("PCSetUp").getPerfInfo()["count"]


def fresh_rhs(problem, seed):
    """A new right-hand side on the problem's geometry: the pressure-projection
    b of another velocity field (deterministic in `seed`)."""
    return problem._rhs(seed, None)


def residual(A, b, x):
    """‖b − A x‖ / ‖b‖."""
    r = b.duplicate()
    A.mult(x, r)
    r.aypx(-1.0, b)
    out = r.norm() / b.norm()
    r.destroy()
    return out


def run_sequence(problem, prefix="", options=None, solves=2, change_every=None,
                 next_problem=None, seed=0):
    """`solves` solves with one KSP, as time stepping runs it: solve k has a
    fresh right-hand side (seed + k) and a zero initial guess; the operator
    stays, so the KSP keeps its set-up (AMG hierarchy, DCDM's network),
    unless `change_every` K: then every K-th solve gets the operator of
    next_problem(j) (j = 1, 2, ...; the caller's geometry sequence, same
    layout) and a new KSP, whose set-up is timed with that solve. Returns
    one record per solve: set-up and solve seconds, PCSetUp events,
    iterations, reason, true residual."""
    options = options or {}
    set_options(prefix, options)
    comm = problem.da.getComm()
    ksp = x = None
    owned = []
    try:
        ksp = create_ksp(problem, prefix)
        x = problem.b.duplicate()
        current, records = problem, []
        for k in range(solves):
            if k and change_every and k % change_every == 0:
                # a new geometry, a new KSP: given a different Mat, PCMG
                # keeps smoothing with the old one (PCSetUp_MG reuses the
                # finest level's operator), and KSPReset crashed the
                # Python contexts (3.18)
                current = next_problem(k // change_every)
                owned.append(current)
                ksp.destroy()
                ksp = None
                ksp = create_ksp(current, prefix)
            records.append(_one_solve(ksp, current, x, seed + k, comm))
        return records
    finally:
        for o in [ksp, x] + owned:
            if o is not None:
                o.destroy()
        clear_options(prefix, options)


def _one_solve(ksp, problem, x, seed, comm):
    b = fresh_rhs(problem, seed)
    try:
        x.set(0.0)
        events = pc_setups()
        setup_s = _timed(comm, lambda: setup_ksp(ksp))
        solve_s = _timed(comm, lambda: solve_ksp(ksp, b, x))
        reason = ksp.getConvergedReason()
        return {"setup_s": setup_s, "solve_s": solve_s, "pc_setups": pc_setups() - events,
                "iterations": ksp.getIterationNumber(), "reason": reason_name(reason),
                "converged": reason > 0, "true_residual": residual(problem.A, b, x)}
    finally:
        b.destroy()
