"""DCDM as a PETSc KSP Python context:

    -ksp_type python -ksp_python_type deepcd_petsc.DCDM

The iteration (Kaneda et al., ICML 2023): d = f(r/‖r‖), A-orthogonalised
against the last m directions, α = dᵀr/dᵀAd, x += αd, r −= αAd. All Krylov
arithmetic is float64 PETSc Vec operations (global dot products), the
network runs in its own dtype. A safeguard replaces a useless network
direction by the Jacobi-preconditioned residual so DCDM never stalls where
CG converges.
"""
import time

from petsc4py import PETSc

from .context import NetworkContext
from .errors import SetupError, reported
from .evaluate import DEFAULT_NORTHO


class DCDM(NetworkContext):
    kind = "ksp"

    def __init__(self):
        super().__init__()
        self.northo = DEFAULT_NORTHO
        self.stagnation = 0.999   # ‖r_new‖ > this·‖r_old‖ counts as stagnation
        self.fallbacks = 0
        self.total_fallbacks = 0
        self.timing = {}

    # -- PETSc protocol ---------------------------------------------------
    def create(self, ksp):
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        ksp.getPC().setType(PETSc.PC.Type.NONE)   # DCDM's preconditioner is the network

    @reported
    def setFromOptions(self, ksp):
        opts = self.read_options(ksp)
        m = opts.getInt("northo", self.northo)
        if m < 0:
            raise SetupError(f"-{self.option_prefix(ksp)}northo must be >= 0, got {m}")
        self.northo = m
        self.stagnation = opts.getReal("stagnation", self.stagnation)

    @reported
    def setUp(self, ksp):
        A, _ = ksp.getOperators()
        self.setup_network(ksp, A)

    def reset(self, ksp):
        self.reset_network()

    def destroy(self, ksp):
        self.reset_network()

    def view(self, ksp, viewer):
        viewer.printfASCII(f"  DCDM: {self.northo} A-orthogonalised previous direction(s), "
                           f"safeguard = Jacobi-preconditioned residual "
                           f"(stagnation threshold {self.stagnation})\n")
        viewer.printfASCII(f"  fallback directions: {self.fallbacks} in the last solve, "
                           f"{self.total_fallbacks} in all\n")
        t, its = self.timing, ksp.getIterationNumber()
        if t.get("total") and its:
            viewer.printfASCII("  per iteration (last solve): " + ", ".join(
                f"{k} {t[k] / its * 1e3:.2f} ms" for k in
                ("total", "network", "forward", "halo", "matmult", "orthogonalise", "other")) + "\n")
        self.view_network(viewer)

    # -- the iteration ----------------------------------------------------
    @reported
    def solve(self, ksp, b, x):
        A, _ = ksp.getOperators()
        if self.evaluator is None:
            self.setUp(ksp)
        work = [b.duplicate() for _ in range(4 + 2 * self.northo)]  # r, minv, m+1 pairs (d, Ad)
        self.timing = dict.fromkeys(("network", "matmult", "orthogonalise", "total"), 0.0)
        ev = self.evaluator
        f0, h0 = ev.forward_s, (ev.halo.seconds if ev.halo is not None else 0.0)
        t0 = time.perf_counter()
        try:
            self._iterate(ksp, A, b, x, *work)
        finally:
            for v in work:
                v.destroy()
            t = self.timing
            t["total"] = time.perf_counter() - t0
            # of the network time: the forward pass itself and the halo exchange
            t["forward"] = ev.forward_s - f0
            t["halo"] = (ev.halo.seconds if ev.halo is not None else 0.0) - h0
            t["other"] = t["total"] - t["network"] - t["matmult"] - t["orthogonalise"]

    def _iterate(self, ksp, A, b, x, r, minv, *pool):
        nullsp = A.getNullSpace()
        try:
            A.getDiagonal(minv)
            minv.reciprocal()
            if not self._finite(minv):
                minv.set(1.0)
        except PETSc.Error:
            minv.set(1.0)          # shell operators without a diagonal: plain residual
        if ksp.getInitialGuessNonzero():
            if nullsp is not None:
                nullsp.remove(x)   # iterates stay out of the null space
            A.mult(x, r)
            r.aypx(-1.0, b)
        else:
            x.set(0.0)
            b.copy(r)
        # m+1 buffer pairs rotate: the newest direction is kept by reference
        free = [(pool[2 * i], pool[2 * i + 1]) for i in range(self.northo + 1)]
        dirs = []                   # (p, Ap, pᵀAp) of the last m directions
        self.fallbacks = 0
        its = 0
        rn = r.norm()
        max_it = ksp.getTolerances()[3]
        if not self._report(ksp, its, rn):
            return
        force_fallback = False
        while True:
            if its >= max_it:
                ksp.setConvergedReason(PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT)
                return
            d, Ad = free[-1]
            used_fallback = force_fallback
            if not force_fallback:
                tn = time.perf_counter()
                self.apply_network(r, d, scale=1.0 / rn)
                self.timing["network"] += time.perf_counter() - tn
            else:
                d.pointwiseMult(minv, r)
            dr, dAd = self._direction(A, nullsp, r, d, Ad, dirs)
            if not used_fallback and not (dr != 0.0 and 0.0 < dAd < float("inf")):
                # the network direction is useless here (NaN/Inf, orthogonal
                # to r, or no curvature): take the classical one instead. Its
                # sign does not matter: α = dᵀr/dᵀAd follows it.
                used_fallback = True
                d.pointwiseMult(minv, r)
                dr, dAd = self._direction(A, nullsp, r, d, Ad, dirs)
            if used_fallback:
                self.fallbacks += 1
                self.total_fallbacks += 1
            if dAd != dAd or dr != dr or abs(dAd) == float("inf"):
                ksp.setConvergedReason(PETSc.KSP.ConvergedReason.DIVERGED_NANORINF)
                return
            if dAd <= 0.0:
                ksp.setConvergedReason(PETSc.KSP.ConvergedReason.DIVERGED_INDEFINITE_MAT)
                return
            if dr == 0.0:
                ksp.setConvergedReason(PETSc.KSP.ConvergedReason.DIVERGED_BREAKDOWN)
                return
            alpha = dr / dAd
            x.axpy(alpha, d)
            r.axpy(-alpha, Ad)
            free.pop()
            dirs.append((d, Ad, dAd))
            if len(dirs) > self.northo:
                p, q, _ = dirs.pop(0)
                free.append((p, q))
            its += 1
            rn_old, rn = rn, r.norm()
            force_fallback = rn > self.stagnation * rn_old
            if not self._report(ksp, its, rn):
                return

    def _direction(self, A, nullsp, r, d, Ad, dirs):
        """Project d out of the null space, A-orthogonalise it against the
        previous directions (updating Ad without another MatMult), and
        return (dᵀr, dᵀAd)."""
        if nullsp is not None:
            nullsp.remove(d)
        t0 = time.perf_counter()
        A.mult(d, Ad)
        t1 = time.perf_counter()
        if dirs:
            # the last m directions are mutually A-orthogonal, so classical
            # Gram-Schmidt (one global reduction) equals the modified one
            for p, _, _ in dirs:
                Ad.dotBegin(p)
            c = [-Ad.dotEnd(p) / pAp for p, _, pAp in dirs]
            d.maxpy(c, [p for p, _, _ in dirs])
            Ad.maxpy(c, [q for _, q, _ in dirs])
        self.timing["matmult"] += t1 - t0
        self.timing["orthogonalise"] += time.perf_counter() - t1
        d.dotBegin(r)       # both reductions in one message
        d.dotBegin(Ad)
        return d.dotEnd(r), d.dotEnd(Ad)

    @staticmethod
    def _finite(v):
        n = v.norm(PETSc.NormType.NORM_INFINITY)
        return n == n and n != float("inf") and n > 0.0

    @staticmethod
    def _report(ksp, its, rn):
        """Record, monitor and test; False once a reason is set."""
        ksp.setIterationNumber(its)
        if rn != rn or rn == float("inf"):   # PETSc refuses a NaN residual norm
            ksp.setConvergedReason(PETSc.KSP.ConvergedReason.DIVERGED_NANORINF)
            return False
        ksp.setResidualNorm(rn)
        ksp.logConvergenceHistory(rn)
        ksp.monitor(its, rn)
        reason = ksp.callConvergenceTest(its, rn)
        if reason:
            ksp.setConvergedReason(reason)
            return False
        return True
