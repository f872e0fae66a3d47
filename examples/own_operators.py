#!/usr/bin/env python3
"""Operators an application assembles itself, outside deepcd's scene
generators: DCDM next to CG + GAMG on each.

    python examples/own_operators.py --kind channel --n 64
    python examples/own_operators.py --kind rough --n 64 --decades 1 --solvers dcdm
    mpiexec -n 2 python examples/own_operators.py --kind grade --shell

Cell-centred finite volumes on a tensor grid, harmonic face coefficients:
  channel  tanh-stretched walls in y (Dirichlet top), periodic in x and z
  grade    x graded geometrically from both walls, Dirichlet x-
  aniso3   cells hx:hy:hz = 1:3:1/5, Dirichlet top
  rough    log-normal k from random Fourier modes of wavenumber ~ --kstd,
           log10 k of standard deviation --decades (README, "Operators
           the scene generators do not make")
  iid      log10 k independent per cell, standard deviation --decades
  strat    a heavy pool under a light phase (ratio --ratio), wavy interface
  perx     periodic in x only, layered k, Dirichlet top
--shell hands DCDM a MATSHELL of the same operator (probed). Extra
-options go to PETSc.
"""
import argparse
import sys
import time

import numpy as np
import petsc4py

KINDS = ("channel", "grade", "aniso3", "rough", "iid", "strat", "perx")
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--kind", default="channel", choices=KINDS)
ap.add_argument("--n", type=int, default=48, help="cells per axis (default 48)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--decades", type=float, default=1.0, help="rough, iid: std of log10 k (default 1)")
ap.add_argument("--kstd", type=float, default=4.0, help="rough: std of the wavenumbers (default 4)")
ap.add_argument("--ratio", type=float, default=1e3, help="strat: density ratio (default 1e3)")
ap.add_argument("--solvers", default="dcdm,cg+gamg", help="comma list of dcdm, cg+gamg, cg+jacobi")
ap.add_argument("--shell", action="store_true", help="DCDM gets the operator as a MATSHELL")
ap.add_argument("--rtol", type=float, default=1e-6)
args, petsc_args = ap.parse_known_args()
petsc4py.init([sys.argv[0]] + petsc_args)
from petsc4py import PETSc  # noqa: E402

from deepcd_petsc.petsc_compat import set_dm_inactive  # noqa: E402

SOLVERS = {"dcdm": {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM"},
           "cg+gamg": {"ksp_type": "cg", "pc_type": "gamg", "ksp_norm_type": "unpreconditioned"},
           "cg+jacobi": {"ksp_type": "cg", "pc_type": "jacobi", "ksp_norm_type": "unpreconditioned"}}


def coefficients(kind, n, rng):
    """(k (nz, ny, nx), [hx, hy, hz], periodic (x, y, z), Dirichlet faces [(axis, side)])."""
    c = (np.arange(n) + 0.5) / n
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    h = [np.full(n, 1.0 / n) for _ in range(3)]
    k, per, dirichlet = np.ones((n, n, n)), [False] * 3, [(2, 1)]
    if kind == "channel":
        beta = rng.uniform(2.5, 3.0)
        s = np.tanh(beta * np.linspace(-1, 1, n + 1)) / np.tanh(beta)
        h[1] = np.diff(s) / 2
        per, dirichlet = [True, False, True], [(1, 1)]
    elif kind == "grade":
        g = rng.uniform(1.06, 1.10) ** np.arange(n // 2)
        h[0] = np.concatenate([g, g[::-1], g[-1:]])[:n]
        dirichlet = [(0, 0)]
    elif kind == "aniso3":
        h = [np.ones(n), np.full(n, 3.0), np.full(n, 0.2)]
    elif kind in ("rough", "iid"):
        if kind == "iid":
            f = rng.standard_normal(k.shape)
        else:
            f = np.zeros_like(k)
            for _ in range(40):
                kv = rng.normal(0, args.kstd, 3)
                f += np.cos(2 * np.pi * (kv[0] * x + kv[1] * y + kv[2] * z) + rng.uniform(0, 2 * np.pi))
        k = 10 ** (args.decades * (f - f.mean()) / f.std())
    elif kind == "strat":
        top = 0.4 + 0.1 * np.sin(2 * np.pi * (x + rng.uniform())) * np.cos(2 * np.pi * y)
        k = np.where(z < top, 1.0, args.ratio)          # 1/ρ: heavy below
    elif kind == "perx":
        k = k * 10 ** rng.uniform(-1, 1, size=(1, n, 1))
        per = [True, False, False]
    return k, h, per, dirichlet


def assemble(da, k, h, per, dirichlet):
    """The two-point flux operator: this rank's box of cells, whose rows
    are PETSc's lo..hi-1 in box order (x fastest); columns through the
    DMDA's AO (natural -> PETSc numbering)."""
    n = k.shape[0]
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    box = np.meshgrid(np.arange(zs, ze), np.arange(ys, ye), np.arange(xs, xe), indexing="ij")
    own = tuple(box)
    cols, vals, diag = [], [], np.zeros(box[0].shape)
    for ax in range(3):                 # x, y, z are array axes 2, 1, 0
        a = 2 - ax
        others = [o for o in range(3) if o != ax]
        area = h[others[0]][box[2 - others[0]]] * h[others[1]][box[2 - others[1]]]
        hc = h[ax][box[a]]
        for step in (-1, 1):
            nb = [b.copy() for b in box]
            nb[a] = box[a] + step
            inside = (nb[a] >= 0) & (nb[a] < n)
            if per[ax]:
                nb[a] %= n
                inside[:] = True
            nbc = tuple(np.where(inside, v, 0) for v in nb)
            hn = h[ax][nbc[a]]
            t = np.where(inside, area / (hc / (2 * k[own]) + hn / (2 * k[nbc])), 0.0)
            diag += t
            for dax, side in dirichlet:
                if dax == ax and step == (1 if side else -1):
                    diag += np.where(inside, 0.0, area * k[own] / (hc / 2))
            cols.append(np.where(inside, np.ravel_multi_index(nbc, k.shape), -1))
            vals.append(-t)
    natural = np.stack([np.ravel_multi_index(own, k.shape)] + cols, -1).reshape(-1, 7)
    v = np.stack([diag] + vals, -1).reshape(-1, 7)
    ao = da.getAO()
    pc = np.where(natural >= 0, ao.app2petsc(np.maximum(natural, 0).ravel().astype(PETSc.IntType))
                  .reshape(natural.shape), -1)
    keep = (pc >= 0) & (v != 0)
    keep[:, 0] = True
    order = np.argsort(np.where(keep, pc, np.iinfo(np.int64).max), axis=1, kind="stable")
    pc, v, keep = (np.take_along_axis(x, order, 1) for x in (pc, v, keep))
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(PETSc.IntType)
    A = da.createMat()
    A.setValuesCSR(indptr, pc[keep].astype(PETSc.IntType), v[keep])    # rows lo..hi-1
    A.assemble()
    return A


def solve(name, A, op, da, b):
    x = b.duplicate()
    ksp = PETSc.KSP().create(da.getComm())
    ksp.setOptionsPrefix(name.replace("+", "_") + "_")
    ksp.setOperators(op)
    ksp.setDM(da)
    set_dm_inactive(ksp)        # the DMDA gives the grid only (KSPSetDMActive, any PETSc)
    opts = PETSc.Options(ksp.getOptionsPrefix())
    for key, v in {**SOLVERS[name], "ksp_rtol": args.rtol, "ksp_max_it": 5000}.items():
        if not opts.hasName(key):
            opts[key] = v
    ksp.setFromOptions()
    t0 = time.perf_counter()
    ksp.setUp()
    t1 = time.perf_counter()
    ksp.solve(b, x)
    t2 = time.perf_counter()
    r = b.duplicate()
    A.mult(x, r)
    r.aypx(-1, b)
    out = dict(solver=name + (" (shell)" if op is not A else ""), iterations=ksp.getIterationNumber(),
               reason=int(ksp.getConvergedReason()), true_rel=r.norm() / b.norm(),
               setup_s=t1 - t0, solve_s=t2 - t1)
    for v in (x, r):
        v.destroy()
    ksp.destroy()
    return out


def main():
    for name in args.solvers.split(","):
        if name not in SOLVERS:
            sys.exit(f"own_operators: unknown solver {name!r}; choose from {', '.join(SOLVERS)}")
    n = args.n
    k, h, per, dirichlet = coefficients(args.kind, n, np.random.default_rng([args.seed, 77]))
    bt = tuple(PETSc.DM.BoundaryType.PERIODIC if p else PETSc.DM.BoundaryType.NONE for p in per)
    da = PETSc.DMDA().create(dim=3, sizes=(n, n, n), dof=1, stencil_width=1, boundary_type=bt,
                             stencil_type=PETSc.DMDA.StencilType.STAR)     # 7-point rows
    A = assemble(da, k, h, per, dirichlet)
    b = da.createGlobalVec()
    natural = np.random.default_rng([args.seed, 99]).standard_normal(n ** 3)
    lo, hi = b.getOwnershipRange()
    with b as arr:              # (writing b.array does not bump its state on PETSc 3.26)
        arr[:] = natural[da.getAO().petsc2app(np.arange(lo, hi, dtype=PETSc.IntType))]
    op = A
    if args.shell:
        class Shell:
            def mult(self, mat, x, y):
                A.mult(x, y)
        op = PETSc.Mat().createPython(A.getSizes(), Shell(), comm=da.getComm())
        op.setUp()
    rows = []
    for name in args.solvers.split(","):
        rows.append(solve(name, A, op if name == "dcdm" else A, da, b))
    if da.getComm().getRank() == 0:
        print(f"{args.kind} {n}^3 seed {args.seed} on {da.getComm().getSize()} rank(s), rtol {args.rtol:g}")
        print("| solver | iterations | reason | true ‖r‖/‖b‖ | set-up s | solve s | total s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['solver']} | {r['iterations']} | {r['reason']} | {r['true_rel']:.1e} | "
                  f"{r['setup_s']:.3f} | {r['solve_s']:.3f} | {r['setup_s'] + r['solve_s']:.3f} |")
    return 0 if all(r["reason"] > 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
