#!/usr/bin/env python3
"""DCDM's per-iteration time split as the median over many solves with
one KSP (as a time-stepping code runs it; the first two are left out as
warm-up), where -ksp_view shows only the last solve's. Extra arguments
are PETSc options.

    python tools/dcdm_split.py [--n 64] [--scene spheres] [--seed 7] [--solves 30] [-ksp_dcdm_northo 1 ...]
"""
import argparse
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--scene", default="spheres")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--solves", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a, petsc_args = ap.parse_known_args()
    if a.solves < 4:
        raise SystemExit("--solves must be >= 4 (two are warm-up, quartiles need two more)")
    import petsc4py
    petsc4py.init(sys.argv[:1] + ["-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
                                  "-ksp_rtol", "1e-6", "-ksp_dcdm_threads", str(a.threads)]
                  + petsc_args)
    from petsc4py import PETSc
    from deepcd_petsc.context import set_flags
    from deepcd_petsc.petsc_compat import set_dm_inactive
    from deepcd_petsc.problem import Problem
    p = Problem.from_scene(a.scene, (a.n,) * 3, seed=a.seed)
    ksp = PETSc.KSP().create()
    x = p.b.duplicate()
    try:
        ksp.setOperators(p.A)
        ksp.setDM(p.da)
        set_dm_inactive(ksp)
        ksp.setFromOptions()
        set_flags(ksp, p.local_flags, p.open_faces)     # this rank's block
        rows = []
        for k in range(a.solves):
            x.set(0.0)
            ksp.solve(p.b, x)
            its = ksp.getIterationNumber()
            t = ksp.getPythonContext().timing
            if k >= 2:
                rows.append({key: v / its * 1e3 for key, v in t.items()})
        keys = ["total", "forward", "matmult", "orthogonalise", "other"]
        med = {key: statistics.median(r[key] for r in rows) for key in keys}
        over = [100 * r["overhead"] / r["total"] for r in rows]
        glue = [100 * r["glue"] / r["total"] for r in rows]
        q = statistics.quantiles(over, n=4)
        print(f"{a.scene} {a.n}³ seed {a.seed}, {its} iterations, median of {len(rows)} solves "
              f"(ms per iteration): " + ", ".join(f"{key} {med[key]:.3f}" for key in keys))
        print(f"overhead (all but forward and MatMult): median {statistics.median(over):.1f}% "
              f"(quartiles {q[0]:.1f}–{q[2]:.1f}); without the A-orthogonalisation and its dot products: "
              f"{statistics.median(glue):.1f}%")
    finally:
        ksp.destroy()
        x.destroy()
        p.destroy()


if __name__ == "__main__":
    main()
