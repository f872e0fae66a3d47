"""DCDM as a PETSc KSP Python context:

    -ksp_type python -ksp_python_type deepcd_petsc.DCDM

The iteration (Kaneda et al., ICML 2023): d = f(r/‖r‖), A-orthogonalised
against the last m directions, α = dᵀr/dᵀAd, x += αd, r −= αAd. All Krylov
arithmetic is float64 on the Vecs' memory (fused kernels, workspace.py;
global dot products), the network runs in its own dtype. A safeguard replaces a useless network
direction by the Jacobi-preconditioned residual; after -ksp_dcdm_switch such
replacements in one solve the network is not helping on this operator, and
the rest of the solve is Jacobi-preconditioned CG (the same recurrence with
d = D⁻¹r, which for a fixed SPD preconditioner is PCG), so DCDM never
converges much slower than CG + Jacobi.
"""
import time

import numpy as np
import torch
from petsc4py import PETSc

from . import islands, kernels
from .context import NetworkContext
from .errors import SetupError, reported
from .evaluate import DEFAULT_NORTHO
from .mgnet import ROUGH_SHARE, rough_cells
from .petsc_compat import null_space
from .workspace import VecView, Workspace


STAGNATION_WINDOW = 3
MAX_CHECK_GAP = 32
# A-orthogonalised directions where islands coupled along every axis (not
# layers) are deflated, unless -ksp_dcdm_northo says: density 64³ seed 9,
# islands and boxes, m = 2, 3, 4: 25, 24, 20 iterations (GAMG 23); the
# graded family's layers gain 0-1 iteration from it (stretch 64³ seeds 1-4,
# 128³ seed 3), not worth 32 bytes per unknown
ISLAND_NORTHO = 4
# cells per side of the boxes deflated beside islands (islands.with_boxes)
DEFLATE_BOX = 16
# The finest level's K-cycle switched on during a solve (3D, no -kcycle):
# where ‖r‖/‖r₀‖ is still above KCYCLE_SLOW after KCYCLE_AT iterations on
# an operator whose coefficients vary cell by cell (coupling planes) and
# have no deflated islands. Aggregation's piecewise-constant coarse levels
# then miss smooth modes the K-cycle recovers: rough log-normal k at 128³,
# 19 -> 9 iterations (GAMG 16); channel 22 -> 15. It costs about 3.1
# MatMults an application instead of 2.65, so it is left off where the
# V-cycle converges well (the families: perm 64³ is done in 7)
KCYCLE_AT = 6
KCYCLE_SLOW = 5e-4


class DCDM(NetworkContext):
    kind = "ksp"

    def __init__(self):
        super().__init__()
        self.northo = DEFAULT_NORTHO
        self.northo_given = None    # -ksp_dcdm_northo; None: by the operator (_choose_northo)
        self.deflate = True         # -ksp_dcdm_deflate: island deflation (islands.py)
        self.deflate_box = DEFLATE_BOX  # -ksp_dcdm_deflate_box: boxes beside the islands (0: none)
        self.box_used = 0           # their size (larger on large grids: islands.MAX_BOXES)
        self.islands = None         # islands.Islands of the operator (None: no contrast)
        self.deflation = None       # islands.Deflation while islands are deflated
        self.islands_note = "none"  # -ksp_view's line where there are none
        # ‖r‖ > this × ‖r‖ of STAGNATION_WINDOW iterations before counts as
        # stagnation: like CG's, DCDM's ‖r‖ need not fall every step (its
        # error's A-norm does), and a one-step test fired on good solves
        # (density 32³: 9 fallbacks, 38 iterations instead of 21)
        self.stagnation = 0.999
        self.fallbacks = 0
        self.checks = 0             # stagnation checks (network vs Jacobi) in the last solve
        self.total_fallbacks = 0
        self.switch = 8             # fallbacks in one solve (and half the checks) before CG + Jacobi
        self.switched_at = None     # iteration of the last solve where it did
        self.switches = 0           # solves that switched, in all
        self.timing = {}
        self.ws = None              # work vectors, kept between solves
        self.minv = None

    # -- PETSc protocol ---------------------------------------------------
    def create(self, ksp):
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        ksp.getPC().setType(PETSc.PC.Type.NONE)   # DCDM's preconditioner is the network

    @reported
    def setFromOptions(self, ksp):
        opts = self.read_options(ksp)
        if opts.hasName("northo"):
            m = opts.getInt("northo")
            if m < 0:
                raise SetupError(f"-{self.option_prefix(ksp)}northo must be >= 0, got {m}")
            self.northo_given = m
        deflate = opts.getBool("deflate", self.deflate)
        box = opts.getInt("deflate_box", self.deflate_box)
        if box < 0:
            raise SetupError(f"-{self.option_prefix(ksp)}deflate_box must be >= 0 "
                             f"(cells per box side; 0: islands only), got {box}")
        if (deflate, box) != (self.deflate, self.deflate_box):
            self.reset_network()       # the islands are found with the network's set-up
        self.deflate, self.deflate_box = deflate, box
        self._choose_northo()
        self.stagnation = opts.getReal("stagnation", self.stagnation)
        sw = opts.getInt("switch", self.switch)
        if sw < 0:
            raise SetupError(f"-{self.option_prefix(ksp)}switch must be >= 0 (0: never), got {sw}")
        self.switch = sw

    @reported
    def setUp(self, ksp):
        A, _ = ksp.getOperators()
        self.setup_network(ksp, A)
        self._workspace(A.getSizes()[0], A.getBlockSize(), A.getComm())

    def operator_ready(self, da):
        self.islands = self.deflation = None
        self.islands_note = ("none (the unit operator of the flags)" if self.stencil is None
                             else f"none (no cell coupled strongly along two axes (2D: one) beside a "
                                  f"{islands.CONTRAST:g}× coefficient jump or anisotropy)")
        if self.deflate and self.stencil is not None:
            from .stencil import Stencil
            st = Stencil.from_packed(self.stencil, self.periodic)
            share = _rough_share(st, da)
            if share > ROUGH_SHARE:
                # islands there are single cells and small clusters: 64³
                # i.i.d. log10 k (σ 0.75 and 1 decade) and rough fields,
                # seeds 0 and 1, took the same iterations (±2) without them
                # and 0.15-0.35 s less (README, "Operators the scene
                # generators do not make")
                self.islands_note = (f"none (rough coefficients: {100 * share:.0f}% of the cells; "
                                     "their strong clusters are too small to deflate)")
                st = None
            self.islands = islands.find(da, st) if st is not None else None
            if self.islands is not None and self.islands.count:
                labels, count = self.islands.labels, self.islands.count
                self.box_used = 0
                if self.deflate_box:
                    labels, count, self.box_used = islands.with_boxes(
                        da, self.islands, st.active(), self.deflate_box)
                defl = islands.Deflation(da, st, labels, count)
                self.deflation = defl if defl.spd else None
                self.islands.labels = None      # (8 bytes a cell) the deflation has its own
        self._choose_northo()

    def _choose_northo(self):
        solid = self.deflation is not None and self.islands.solid > 0
        self.northo = (self.northo_given if self.northo_given is not None
                       else ISLAND_NORTHO if solid else DEFAULT_NORTHO)

    def _workspace(self, sizes, bsize, comm):
        """r, D⁻¹ and m+1 (d, Ad) pairs, allocated at set-up (as PETSc's
        own KSPs do) and kept between solves."""
        # with m = 0 one more slot holds a check's Jacobi candidate (else the
        # oldest direction's slot does: it leaves after this step anyway)
        count = 2 + 2 * (self.northo + 1 + (self.northo == 0))
        if self.ws is None or not self.ws.fits(sizes, count):
            self._free_workspace()
            self.ws = Workspace(sizes, bsize, comm, count)
        return self.ws

    def reset(self, ksp):
        self.reset_network()
        self._free_workspace()
        self.islands = self.deflation = None

    def destroy(self, ksp):
        self.reset(ksp)

    @reported
    def view(self, ksp, viewer):
        viewer.printfASCII(f"  DCDM: {self.northo} A-orthogonalised previous direction(s); "
                           f"safeguard: where ‖r‖ > {self.stagnation} × ‖r‖ {STAGNATION_WINDOW} "
                           f"iterations before, the Jacobi direction D⁻¹r replaces the network's "
                           f"when it lowers the error's energy more\n")
        viewer.printfASCII(f"  island deflation: {self._islands_text()}\n")
        viewer.printfASCII(f"  fallback directions: {self.fallbacks} in the last solve "
                           f"({self.checks} check(s)), {self.total_fallbacks} in all\n")
        sw = (f"after {self.switch} fallbacks in a solve, if Jacobi won half the checks"
              if self.switch and self.northo
              else "never" + (" (needs northo >= 1)" if self.switch else ""))
        last = (f"the last solve switched at iteration {self.switched_at}"
                if self.switched_at is not None else "the last solve did not")
        viewer.printfASCII(f"  switch to CG + Jacobi: {sw}; {last} ({self.switches} solve(s) in all)\n")
        viewer.printfASCII(f"  Krylov vector work: {kernels.status()}\n")
        t, its = self.timing, ksp.getIterationNumber()
        if t.get("total") and its:
            viewer.printfASCII("  per iteration (last solve): " + ", ".join(
                f"{k} {t[k] / its * 1e3:.2f} ms" for k in
                ("total", "network", "forward", "halo", "matmult", "orthogonalise", "other")) + "\n")
            over, rest = t["overhead"], t["glue"]
            viewer.printfASCII(f"  overhead (all but the network's forward pass and MatMult): "
                               f"{over / its * 1e3:.2f} ms = {100 * over / t['total']:.1f}%; "
                               f"without the A-orthogonalisation and its dot products "
                               f"(x/r update with ‖r‖, Python/PETSc glue): "
                               f"{rest / its * 1e3:.2f} ms = {100 * rest / t['total']:.1f}%\n")
        self.view_network(viewer)

    def _islands_text(self):
        isl = self.islands
        m = (f"; m = {ISLAND_NORTHO}" if self.northo_given is None and isl is not None
             and isl.solid else "")
        if not self.deflate:
            return "off (-ksp_dcdm_deflate 0)"
        if isl is None:
            return self.islands_note
        if not isl.count and isl.found > islands.MAX_CANDIDATES:
            return f"none ({isl.found} candidate regions, more than {islands.MAX_CANDIDATES})"
        if not isl.count:
            return (f"none (no region coupled {islands.CONTRAST:g}× more strongly inside than "
                    "across its boundary, along two axes or more (2D: one), with symmetric rows)")
        if self.deflation is None:
            return f"{isl.count} island(s) found, not deflated: ZᵀAZ is not positive definite"
        more = f" (the largest {isl.count} of {isl.found})" if isl.found > isl.count else ""
        boxes = self.deflation.count - isl.count
        box = (f" and {boxes} box(es) of {self.box_used}³ cells for the rest"
               if boxes else "")
        return (f"{isl.count} island(s){more}, {isl.cells} cells, coupled "
                f"≥ {islands.CONTRAST:g}× more strongly inside than across their boundary: "
                f"one coarse vector each{box} (x₀ = Z E⁺ Zᵀ b, directions A-orthogonal to Z; "
                f"{self.deflation.nnz} nonzeros of AZ){m}")

    # -- the iteration ----------------------------------------------------
    @reported
    def solve(self, ksp, b, x):
        A, _ = ksp.getOperators()
        self.setUp(ksp)          # no-op unless new, or the operator changed
        ws = self._workspace(b.getSizes(), b.getBlockSize(), b.getComm())
        self.timing = dict.fromkeys(("network", "matmult", "orthogonalise", "total"), 0.0)
        ev = self.evaluator
        f0, h0 = ev.forward_s, (ev.halo.seconds if ev.halo is not None else 0.0)
        t0 = time.perf_counter()
        try:
            self._iterate(ksp, A, b, x, ws)
        finally:
            t = self.timing
            t["total"] = time.perf_counter() - t0
            # of the network time: the forward pass itself and the halo exchange
            t["forward"] = ev.forward_s - f0
            t["halo"] = (ev.halo.seconds if ev.halo is not None else 0.0) - h0
            t["other"] = t["total"] - t["network"] - t["matmult"] - t["orthogonalise"]
            # everything but the forward pass (the halo exchange is inside
            # it) and MatMult; "glue" the same without the A-orthogonalisation
            # and its dot products: the x/r update with ‖r‖, Python/PETSc glue
            t["overhead"] = t["total"] - t["forward"] - t["matmult"]
            t["glue"] = t["overhead"] - t["orthogonalise"]

    def _free_workspace(self):
        if self.ws is not None:
            self.ws.destroy()
            self.ws = None

    def _iterate(self, ksp, A, b, x, ws):
        nullsp = null_space(A)     # None without one (petsc4py returns an empty handle)
        r, rt = ws.vecs[0], ws.rows[0]
        if ksp.getInitialGuessNonzero():
            if nullsp is not None:
                nullsp.remove(x)   # iterates stay out of the null space
            A.mult(x, r)
            r.aypx(-1.0, b)
        else:
            x.set(0.0)
            b.copy(r)
        self._deflate_start(A, nullsp, b, x, r, rt)
        # m+1 (d, Ad) slots rotate: the newest direction is kept by reference
        free = [(ws.vecs[i], ws.rows[i], ws.vecs[i + 1], ws.rows[i + 1])
                for i in range(2, ws.count, 2)]
        dirs = []                   # (slot, pᵀAp) of the last m directions
        self.fallbacks = 0
        self.checks = 0
        self.switched_at = None
        jacobi_only = False         # CG + Jacobi for the rest of this solve
        rz = None                   # its rᵀD⁻¹r
        self.minv = None            # Jacobi safeguard's D⁻¹, read on first use
        its = 0
        rn = rn0 = ws.norm(rt)
        history = []                # ‖r‖ before each step
        zero_guess = not ksp.getInitialGuessNonzero()
        max_it = ksp.getTolerances()[3]
        if not self._report(ksp, its, rn):
            return
        check = False               # compare the network's direction with Jacobi's
        gap, next_check = 0, 0      # back-off after checks the network won
        with VecView(x) as xt:
            while True:
                if its >= max_it:
                    ksp.setConvergedReason(PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT)
                    return
                slot = d, dt, Ad, Adt = free[-1]
                used_fallback = False
                if jacobi_only:
                    # PCG with D⁻¹: p = z + βp_old, β = rᵀz / r_oldᵀz_old (the
                    # r-based β: A-orthogonalising z is unstable here)
                    torch.mul(self._jacobi(A, ws), rt, out=dt)
                    rz, rz_old = ws.dots(rt, [dt])[0], rz
                    if rz_old is not None and dirs:
                        dt.add_(dirs[-1][0][1], alpha=rz / rz_old)
                    dr, dAd = self._direction(A, nullsp, ws, rt, d, dt, Ad, Adt, [])
                else:
                    tn = time.perf_counter()
                    r.stateIncrease()
                    self.apply_network(r, d, 1.0 / rn, views=(rt, dt))
                    self.timing["network"] += time.perf_counter() - tn
                    dr, dAd = self._direction(A, nullsp, ws, rt, d, dt, Ad, Adt, dirs)
                    if not _usable(dr, dAd):
                        # the network direction is useless here (NaN/Inf, orthogonal
                        # to r, or no curvature): take the classical one instead. Its
                        # sign does not matter: α = dᵀr/dᵀAd follows it.
                        used_fallback = True
                        self.checks += 1
                        torch.mul(self._jacobi(A, ws), rt, out=dt)
                        dr, dAd = self._direction(A, nullsp, ws, rt, d, dt, Ad, Adt, dirs)
                    elif check:
                        # ‖r‖ stagnated (it need not fall every step: the error's
                        # A-norm does). Is the network still better than Jacobi
                        # here? Both directions' energy decrease (dᵀr)²/dᵀAd, one
                        # more MatMult; the larger one is taken
                        # the candidate's slot: a free one, else the oldest
                        # direction's (then A-orthogonal to the others only)
                        spare = len(free) > 1
                        alt = free[-2] if spare else dirs[0][0]
                        torch.mul(self._jacobi(A, ws), rt, out=alt[1])
                        drj, dAdj = self._direction(A, nullsp, ws, rt, *alt,
                                                    dirs if spare else dirs[1:])
                        self.checks += 1
                        if _usable(drj, dAdj) and drj * drj / dAdj > dr * dr / dAd:
                            used_fallback = True
                            if spare:
                                free[-1], free[-2] = alt, slot
                            else:
                                free.append(dirs.pop(0)[0])
                            slot = d, dt, Ad, Adt = alt
                            dr, dAd = drj, dAdj
                            gap = 0
                        else:
                            # a network that keeps winning on a slowly converging
                            # operator (stretch 128³: 197 checks in 400 steps)
                            # is checked less and less often: 1, 2, 4, … 32 steps
                            gap = min(2 * gap or 1, MAX_CHECK_GAP)
                        next_check = its + gap
                if used_fallback and not jacobi_only:
                    self.fallbacks += 1
                    self.total_fallbacks += 1
                    if self.switch and self.northo and self.fallbacks >= self.switch \
                            and 2 * self.fallbacks >= self.checks:
                        # Jacobi won at least half of the checks: the network is
                        # worse than D⁻¹ here, and mixing network and Jacobi
                        # directions breaks either recurrence. From here on,
                        # PCG with D⁻¹ alone; from
                        # the zero guess again when the network gained less
                        # than a decade (its directions can leave error in
                        # modes Jacobi-CG is slow on: 365 vs 264 iterations)
                        jacobi_only = True
                        self.switched_at = its
                        self.switches += 1
                        if zero_guess and rn > 0.1 * rn0:
                            xt.zero_()
                            x.stateIncrease()
                            b.copy(r)
                            self._deflate_start(A, nullsp, b, x, r, rt, xt)
                            rn = ws.norm(rt)
                            continue
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
                history.append(rn)
                rn = ws.step(alpha, xt, dt, rt, Adt)   # x += αd, r −= αAd
                x.stateIncrease()    # monitors reading x see the new iterate
                free.pop()
                dirs.append((slot, dAd))
                if len(dirs) > self.northo:
                    free.append(dirs.pop(0)[0])
                its += 1
                if its == KCYCLE_AT and not jacobi_only and rn > KCYCLE_SLOW * rn0:
                    self._kcycle_on(its)
                check = not jacobi_only and its >= next_check and (
                    len(history) >= STAGNATION_WINDOW and
                    rn > self.stagnation * history[-STAGNATION_WINDOW])
                if not self._report(ksp, its, rn):
                    return

    def _kcycle_on(self, its):
        """KCYCLE_AT's switch, when the operator qualifies; it lasts as long
        as this network's geometry (a new operator starts on the V-cycle)."""
        geo = getattr(self.evaluator, "geo", None)
        if (self.kcycle_levels is not None or self.grid_dim != 3 or self.deflation is not None
                or not isinstance(geo, dict) or geo.get("kcycle", 0) or geo.get("L", 0) < 3):
            return
        lv = geo["levels"][0]
        if "coef" not in lv or lv["coef"].shape[-3:] == (1, 1, 1):
            return      # the flags' unit operator, or one coupling per axis (aniso's cells)
        geo["kcycle"] = 1
        geo["kcycle_auto"] = its            # for -ksp_view

    def _deflate_start(self, A, nullsp, b, x, r, rt, xt=None):
        """x += Z E⁺ Zᵀ r, r = b − Ax: the islands' part of the solution
        (then Zᵀr = 0, which the directions keep)."""
        if self.deflation is None:
            return
        y = self.deflation.coarse(rt)
        if xt is None:
            with VecView(x) as view:
                self.deflation.add(view, y)
        else:
            self.deflation.add(xt, y)
            x.stateIncrease()
        if nullsp is not None:
            nullsp.remove(x)
        A.mult(x, r)
        r.aypx(-1.0, b)

    def _jacobi(self, A, ws):
        """D⁻¹ of the current operator (1 where it has no usable diagonal)."""
        if self.minv is None:
            minv, mt = ws.vecs[1], ws.rows[1]
            try:
                A.getDiagonal(minv)
                # as VecReciprocal: zero entries stay zero
                torch.where(mt != 0, mt.reciprocal(), torch.zeros_like(mt), out=mt)
                if not ws.all_finite_nonzero(mt):
                    mt.fill_(1.0)
            except PETSc.Error:
                mt.fill_(1.0)      # shell operators without a diagonal: plain residual
            self.minv = mt
        return self.minv

    def _direction(self, A, nullsp, ws, rt, d, dt, Ad, Adt, dirs):
        """Project d out of the null space, A-orthogonalise it against the
        previous directions (updating Ad without another MatMult), and
        return (dᵀr, dᵀAd)."""
        if self.deflation is not None:     # A-orthogonal to the islands too
            t = time.perf_counter()
            self.deflation.project(dt)
            self.timing["orthogonalise"] += time.perf_counter() - t
        d.stateIncrease()              # torch wrote it: no cached norms
        if nullsp is not None:
            nullsp.remove(d)
        t0 = time.perf_counter()
        A.mult(d, Ad)
        t1 = time.perf_counter()
        # pᵀ(Ad) = 0 (not dᵀ(Ap) = 0) keeps r ⟂ p when A is not quite
        # symmetric (PETSc's ex45: 8 iterations instead of 45). The last m
        # directions are mutually A-orthogonal, so classical Gram-Schmidt
        # (one global reduction) equals the modified one
        ps = [slot[1] for slot, _ in dirs]
        c = ws.dots(Adt, ps) if dirs else []
        out = ws.orthogonalise([cj / pAp for cj, (_, pAp) in zip(c, dirs)],
                               ps, [slot[3] for slot, _ in dirs], dt, Adt, rt)
        self.timing["matmult"] += t1 - t0
        self.timing["orthogonalise"] += time.perf_counter() - t1
        return out

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


def _usable(dr, dAd):
    """A direction with a step: dᵀr ≠ 0 and finite positive curvature."""
    return dr != 0.0 and 0.0 < dAd < float("inf")


def _rough_share(st, da):
    """mgnet.rough_share of the operator's stencil before the network is
    built (the same cells, summed over the ranks)."""
    from mpi4py import MPI
    m = rough_cells(torch.from_numpy(st.coef[None]))
    active = st.active()
    rough = 0 if m is None else int((m[0, 0].numpy() & active).sum())
    rough, cells = da.getComm().tompi4py().allreduce(np.array([rough, int(active.sum())]), op=MPI.SUM)
    return rough / max(int(cells), 1)
