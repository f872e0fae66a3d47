"""`deepcd simulate`: a small incompressible smoke / liquid solver whose
pressure projection runs through any PETSc KSP (DCDM, CG + GAMG, ...).

MAC grid on DMDAs (simulate_grid.py), semi-Lagrangian advection, buoyant
smoke or a free-surface liquid (level set), a sphere moving through it
(simulate_scenes.py). Each step solves A p = -div(u*) (scaled: p is
dt·p/(ρ·dx), so u -= p[I] - p[I - e] is the projection) with one KSP kept
for the whole run: warm-started from the last pressure, its set-up kept while
the operator is unchanged. Statistics and pictures: simulate_output.py.
"""
import math
import os
import shlex
import sys
import time

import numpy as np

from .errors import UserError, petsc_errors


def add_parser(sub):
    """The `simulate` subcommand's options (cli.py registers it)."""
    s = sub.add_parser("simulate", help="smoke / liquid simulation, pressure through any PETSc KSP",
                       description="Extra -options configure the pressure KSP, e.g. "
                                   "-ksp_type python -ksp_python_type deepcd_petsc.DCDM or "
                                   "-ksp_type cg -pc_type gamg.")
    s.add_argument("--scene", default="smoke", help="smoke | liquid (default smoke)")
    s.add_argument("--n", help="cubic grid size N (default 32)")
    s.add_argument("--shape", help="grid NX,NY,NZ")
    s.add_argument("--steps", type=int, default=50, help="time steps (default 50)")
    s.add_argument("--seed", type=int, default=0,
                   help="scene seed: the random variations of the source and obstacle (default 0)")
    s.add_argument("--cfl", type=float, default=1.5,
                   help="largest backtrace in cells; sets the ghost width (default 1.5)")
    s.add_argument("--dt", type=float, help="largest time step (default cfl·dx: speed 1 at the CFL)")
    s.add_argument("--obstacle-every", type=int, default=1, metavar="K",
                   help="move the obstacle every K steps (0: it stays put); the operator is "
                        "rebuilt only when the cell flags change")
    s.add_argument("--pc-lag", type=int, default=1, metavar="L",
                   help="rebuild the KSP's preconditioner at every L-th operator change only "
                        "(PCSetReusePreconditioner in between; default 1: at every change)")
    s.add_argument("--frame-every", type=int, default=5, metavar="k",
                   help="write a PNG every k steps (0: none)")
    s.add_argument("--no-gif", action="store_true", help="skip the GIF at the end")
    s.add_argument("--out", default="sim_out", help="output folder (default sim_out)")
    s.add_argument("--quiet", action="store_true", help="no line per step")
    s.add_argument("--compare-stats", nargs="+", metavar="STATS",
                   help="only plot the per-step pressure time of these stats.json files "
                        "into OUT/compare.png")
    return s


def main(argv=None):
    """`deepcd simulate ARGS` (the CLI's error handling and exit codes)."""
    from .cli import main as cli_main
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli_main(["simulate"] + argv)


def run(a, petsc_args):
    from . import simulate_output as out
    if a.compare_stats:
        if petsc_args:
            raise UserError(f"--compare-stats takes no PETSc options: {' '.join(petsc_args)}")
        out.check_out_dir(a.out)
        return out.compare(a.compare_stats, a.out)
    settings = _settings(a)
    out.check_out_dir(a.out)
    from .cli import init_petsc
    PETSc = init_petsc(petsc_args)
    sim = Simulation(settings, PETSc.COMM_WORLD)
    try:
        size = PETSc.COMM_WORLD.getSize()
        return sim.run(a.out, (f"mpiexec -n {size} " if size > 1 else "") + "deepcd " + shlex.join(sys.argv[1:]))
    finally:
        sim.destroy()


def _settings(a):
    """Validated options (UserError: one line, exit 2)."""
    from .problem import parse_shape
    from .simulate_scenes import SIM_SCENES
    if a.scene not in SIM_SCENES:
        raise UserError(f"unknown scene {a.scene!r} for simulate; choose one of {', '.join(SIM_SCENES)}")
    shape = parse_shape(a.n if a.n or a.shape else 32, a.shape)
    if min(shape) < 8:
        raise UserError(f"grid {'x'.join(map(str, shape))} is too small: simulate needs >= 8 cells per dimension")
    for name, v, lo in (("--steps", a.steps, 1), ("--obstacle-every", a.obstacle_every, 0),
                        ("--pc-lag", a.pc_lag, 1), ("--frame-every", a.frame_every, 0)):
        if v < lo:
            raise UserError(f"{name} must be >= {lo}, got {v}")
    if not (0 < a.cfl <= 8):
        raise UserError(f"--cfl must be in (0, 8], got {a.cfl}")
    if a.dt is not None and not a.dt > 0:
        raise UserError(f"--dt must be > 0, got {a.dt}")
    return dict(scene=a.scene, shape=shape, steps=a.steps, seed=a.seed, cfl=a.cfl, dt=a.dt,
                obstacle_every=a.obstacle_every, pc_lag=a.pc_lag, frame_every=a.frame_every,
                gif=not a.no_gif, quiet=a.quiet)


class PressureSolver:
    """One KSP for the whole run, configured from the options database.

    A new operator is handed over only when the flags changed. The
    preconditioner is rebuilt at every `lag`-th change and reused otherwise
    (PCSetReusePreconditioner). DCDM gets the new cell flags through
    set_flags and rebuilds the network's geometry tensors, keeping the
    loaded model; `model_loads` counts distinct models seen."""

    def __init__(self, grid, lag):
        from petsc4py import PETSc
        from .petsc_compat import set_dm_inactive
        self.PETSc = PETSc
        self.lag = lag
        self.changes = 0
        self.ksp = PETSc.KSP().create(grid.comm)
        self.ksp.setDM(grid.dap)
        set_dm_inactive(self.ksp)
        self.ksp.setType("cg")
        self.ksp.getPC().setType("jacobi")
        self.ksp.setInitialGuessNonzero(True)
        self._configure()           # loads a Python KSP's module now, not in step 0
        self.A = self.ns = None
        self.nets = []
        self.evaluator = None
        PETSc.Log.begin()
        self.pc_event = PETSc.Log.Event("PCSetUp")

    def set_operator(self, A, ns, flags=None):
        """Hand over a new operator (the old one is freed). `flags`: the
        (flags, open faces) A was assembled from, given to a DCDM/NetworkPC
        through set_flags, which saves deriving them back from A's rows
        (most of DCDM's set-up per change); other solvers ignore them."""
        pc = self.ksp.getPC()
        rebuild = self.changes % self.lag == 0
        self.changes += 1
        self.ksp.setOperators(A)
        if flags is not None and rebuild:
            from .context import set_flags
            set_flags(self.ksp, *flags)
        pc.setReusePreconditioner(not rebuild)
        for o in (self.A, self.ns):
            if o is not None:
                o.destroy()
        self.A, self.ns = A, ns

    def _configure(self):
        from .solvers import _UNPREC_OK
        PETSc, ksp = self.PETSc, self.ksp
        with petsc_errors("invalid solver options"):
            ksp.setFromOptions()
            if not PETSc.Options(ksp.getOptionsPrefix()).hasName("ksp_norm_type") and \
                    ksp.getType() in _UNPREC_OK:
                ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)

    @property
    def context(self):
        if self.ksp.getType() == self.PETSc.KSP.Type.PYTHON:
            return self.ksp.getPythonContext()
        return None

    def label(self):
        ctx = self.context
        name = type(ctx).__name__ if ctx is not None else self.ksp.getType()
        pc = self.ksp.getPC().getType()
        return name if pc == "none" else f"{name}+{pc}"

    def solve(self, b, x):
        """Set up (timed apart) and solve; returns this step's record."""
        comm = self.ksp.getComm()
        pc = self.ksp.getPC()
        before = self.pc_event.getPerfInfo()["count"]
        with petsc_errors("solver set-up failed"):
            comm.barrier()
            t0 = time.perf_counter()
            self.ksp.setUp()
            ctx = self.context
            if ctx is not None and hasattr(ctx, "setUp"):
                ctx.setUp(self.ksp)   # no-op unless the operator changed (PETSc calls it once)
            pc.setUp()
            comm.barrier()
            t1 = time.perf_counter()
        with petsc_errors("solve failed"):
            self.ksp.solve(b, x)
            comm.barrier()
            t2 = time.perf_counter()
        pc.setReusePreconditioner(True)
        rec = dict(iterations=self.ksp.getIterationNumber(),
                   reason=int(self.ksp.getConvergedReason()),
                   setup_s=t1 - t0, solve_s=t2 - t1,
                   pc_rebuilt=self.pc_event.getPerfInfo()["count"] > before)
        ctx = self.context
        if ctx is not None and getattr(ctx, "net", None) is not None:
            if not any(n is ctx.net for n in self.nets):
                self.nets.append(ctx.net)
            rec["network_rebuilt"] = ctx.evaluator is not self.evaluator
            self.evaluator = ctx.evaluator
            rec["model_loads"] = len(self.nets)
            split = getattr(ctx, "setup_s", {}) if rec["network_rebuilt"] else {}
            for k in ("geometry", "evaluator"):   # where a network rebuild's time goes
                rec[f"network_{k}_s"] = split.get(k, 0.0)
        return rec

    def destroy(self):
        self.ksp.destroy()   # a Python KSP left to the GC can crash PETSc 3.18 at exit
        for o in (self.A, self.ns):
            if o is not None:
                o.destroy()


class Simulation:
    def __init__(self, settings, comm):
        from .simulate_grid import Grid
        from .simulate_scenes import SCENE_CLASSES
        self.s = settings
        self.comm = comm
        self.grid = Grid(settings["shape"], settings["cfl"], comm)
        self.scene = SCENE_CLASSES[settings["scene"]](self.grid, settings["seed"])
        self.solver = PressureSolver(self.grid, settings["pc_lag"])
        self.U, self.q = self.scene.initial()
        self.p = self.grid.dap.createGlobalVec()
        self.p.set(0.0)
        self.b = self.grid.dap.createGlobalVec()
        self.flags = self.liquid = None
        self.t = 0.0
        self.dt_max = settings["dt"] or settings["cfl"] * self.grid.dx

    # -- one step ------------------------------------------------------------
    def time_step(self):
        """dt from the CFL bound (global max speed: equal on any rank count)."""
        from mpi4py import MPI
        g = self.grid
        umax = max(float(np.abs(self.U[..., a][g.valid(a)]).max(initial=0.0)) for a in range(3))
        umax = self.comm.tompi4py().allreduce(umax, op=MPI.MAX)
        return min(self.dt_max, self.s["cfl"] * g.dx / umax) if umax > 0 else self.dt_max

    def obstacle(self, step):
        K = self.s["obstacle_every"]
        if self.flags is not None and (K == 0 or step % K):
            return self.solid, self.solid_vel
        centre, vel = self.scene.obstacle(self.t, moving=K > 0)
        self.solid, self.solid_vel = self.scene.solid(centre), vel
        return self.solid, self.solid_vel

    def _boundaries(self):
        """Per component: solid faces (and their velocity: the obstacle's
        inside the domain, 0 on walls) and the faces the pressure moves."""
        from .scenes import padded
        P = padded(self.flags, self.scene.open_faces)
        self.moved, self.solid_faces, self.solid_values = [], [], []
        for a in range(3):
            solid, moved, wall = self.grid.boundary(P, a)
            self.solid_faces.append(solid)
            self.moved.append(moved)
            self.solid_values.append(np.where(wall, 0.0, self.solid_vel[a])[solid])

    def _enforce_solids(self):
        for a in range(3):
            self.U[..., a][self.solid_faces[a]] = self.solid_values[a]
        self.grid.fill_slots(self.U)

    def _rhs(self):
        """b = -(net outflow) on fluid cells; returns ‖div u*‖·dx."""
        g = self.grid
        fluid = g.own(self.flags) == 0
        flux = np.where(fluid, g.flux_sum(g.U.exchange(self.U)), 0.0)
        with self.b as arr:
            arr[...] = -flux.ravel()
        if self.solver.ns is not None:
            self.solver.ns.remove(self.b)
        return self._norm(flux)

    def _norm(self, local):
        from mpi4py import MPI
        return math.sqrt(self.comm.tompi4py().allreduce(float((local ** 2).sum()), op=MPI.SUM))

    def step(self, k):
        g = self.grid
        clock = _Clock(self.comm)
        dt = self.time_step()
        solid, _ = self.obstacle(k)
        G = g.U.exchange(self.U)
        self.q = g.advect_scalar(g.Q.exchange(self.q), G, dt)
        self.U = g.advect_velocity(G, dt)
        self.U, self.q = self.scene.forces(self.U, self.q, dt, k)
        clock.lap("advect_s")
        flags, self.liquid = self.scene.flags(self.q, solid)
        changed = self.flags is None or not np.array_equal(flags, self.flags)
        if changed:
            self.flags = flags
            self._boundaries()
            self.solver.set_operator(*g.operator(flags, self.scene.open_faces),
                                     flags=(flags, self.scene.open_faces))
        elif self.s["obstacle_every"] and k % self.s["obstacle_every"] == 0:
            self._boundaries()      # same cells, new obstacle velocity
        if not self.scene.liquid:
            self.q[g.own(self.flags) == 1] = 0.0
        self._enforce_solids()
        clock.lap("assembly_s")
        div0 = self._rhs()
        clock.lap("rhs_s")
        rec = self.solver.solve(self.b, self.p)
        clock.lap("pressure_s")
        with self.p as arr:                 # p = 0 off the fluid (warm start too)
            arr[g.own(self.flags).ravel() != 0] = 0.0
            p_ghost = g.P.exchange(arr.reshape(g.cshape()))
        self.U = g.project(self.U, p_ghost, self.moved)
        fluid = g.own(self.flags) == 0
        div1 = self._norm(np.where(fluid, g.flux_sum(g.U.exchange(self.U)), 0.0))
        if self.scene.liquid:
            self._extrapolate()
        clock.lap("project_s")
        self.t += dt
        rec.update(step=k, t=self.t, dt=dt, operator_changed=changed,
                   fluid_cells=int(self.comm.tompi4py().allreduce(int(fluid.sum()))),
                   div_before=div0 / g.dx, div_after=div1 / g.dx,
                   div_ratio=div1 / div0 if div0 > 0 else 0.0)
        rec.update(clock.laps)
        rec["step_s"] = sum(clock.laps.values())
        return rec

    def _extrapolate(self):
        """Liquid: faces beside no liquid cell are not the liquid's; refill
        them from the liquid's faces (one layer per sweep)."""
        g = self.grid
        L = np.pad(self.liquid, 1)
        known = np.empty(self.U.shape, bool)
        for a in range(3):
            lo, hi = g.face_sides(L, a)
            known[..., a] = (lo | hi) & ~self.solid_faces[a] & g.valid(a)
        self.U = g.extrapolate(self.U, known, g.ghost + 1)
        self._enforce_solids()

    # -- the run ---------------------------------------------------------------
    def run(self, out_dir, command):
        from mpi4py import MPI
        from .simulate_output import Recorder
        rank = self.comm.getRank()
        rec = Recorder(out_dir, self.s, self.comm, command) if rank == 0 else None
        status, t0 = 0, time.perf_counter()
        stop = _StopRequest(rank)
        try:
            for k in range(self.s["steps"]):
                if self.comm.tompi4py().allreduce(stop.requested, op=MPI.MAX):
                    raise KeyboardInterrupt
                r = self.step(k)
                if k == 0 and rank == 0:
                    rec.settings.update(solver=self.solver.label(), ranks=self.comm.getSize(),
                                        rtol=self.solver.ksp.getTolerances()[0])
                if r["reason"] <= 0:
                    status = 1
                self._frame(rec, k)
                if rank == 0:
                    rec.add(r, time.perf_counter() - t0)
        except KeyboardInterrupt:
            status = 130
            if rank == 0:
                print("interrupted: keeping the statistics and frames written so far", file=sys.stderr)
        finally:
            stop.restore()
            if rank == 0:
                rec.finish(time.perf_counter() - t0, interrupted=status == 130)
        return status

    def _frame(self, rec, k):
        every = self.s["frame_every"]
        if not every or (k + 1) % every:
            return
        q = self.grid.to_root(self.q)
        if rec is not None:
            img, solid = self.scene.image(q, self.flags)
            rec.frame(k, self.t, img, solid)

    def destroy(self):
        self.solver.destroy()
        for v in (self.p, self.b):
            v.destroy()
        self.grid.destroy()


class _StopRequest:
    """The first Ctrl-C asks the run to stop after the current step; the
    second interrupts at once. An interrupt raised wherever the signal
    happens to land can be swallowed: inside a garbage-collector or weakref
    callback (matplotlib's) Python prints "Exception ignored" and runs on.
    A flag read between steps cannot be lost, and the ranks agree on it
    (one reduction per step), so no rank stops inside a collective alone."""

    def __init__(self, rank=0):
        import signal
        import threading
        self.requested = 0
        self.rank = rank
        self._old = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        import signal
        self.requested = 1
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.rank == 0:
            # os.write: print() inside a handler that interrupted a print
            # to the same stream raises "reentrant call"
            os.write(2, b"interrupt: stopping after this step (Ctrl-C again stops now)\n")

    def restore(self):
        import signal
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class _Clock:
    """Wall-clock laps, synchronised across ranks (the slowest rank counts)."""

    def __init__(self, comm):
        self.comm = comm
        comm.barrier()
        self.t = time.perf_counter()
        self.laps = {}

    def lap(self, name):
        self.comm.barrier()
        t = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + t - self.t
        self.t = t
