#!/usr/bin/env python3
"""Solve one pressure scene with PETSc's classical solvers and print a table.

    python examples/baselines.py --scene spheres --n 64 --seed 7
    mpiexec -n 2 python examples/baselines.py --scene liquid --n 128

Any extra -options go to PETSc (e.g. -ksp_rtol 1e-8).
"""
import argparse
import sys

import petsc4py

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--scene", default="spheres")
ap.add_argument("--n", type=int, default=64)
ap.add_argument("--seed", type=int, default=7)
ap.add_argument("--rtol", default="1e-6")
ap.add_argument("--solvers", default="cg+jacobi,cg+icc,cg+gamg,cg+hypre,cg+mg")
args, petsc_args = ap.parse_known_args()
petsc4py.init([sys.argv[0]] + petsc_args)
from petsc4py import PETSc  # noqa: E402

from deepcd_petsc.problem import Problem  # noqa: E402
from deepcd_petsc.solvers import baseline_options, baseline_unavailable, run_ksp  # noqa: E402
from deepcd_petsc.tables import markdown_table  # noqa: E402

problem = Problem.from_scene(args.scene, (args.n,) * 3, seed=args.seed)
rows = []
skipped = []
for name in args.solvers.split(","):
    why = baseline_unavailable(name)
    if why:                      # e.g. cg+hypre on a PETSc built without hypre
        skipped.append(f"{name}: unavailable ({why})")
        continue
    opts = baseline_options(name, problem)
    opts["ksp_rtol"] = args.rtol
    prefix = name.replace("+", "_") + "_"
    r = run_ksp(problem, prefix=prefix, options=opts)
    r.update(solver=name, total_s=r["setup_s"] + r["solve_s"])
    rows.append(r)
if PETSc.COMM_WORLD.getRank() == 0:
    print(f"scene {args.scene}, {args.n}^3, seed {args.seed}, "
          f"{PETSc.COMM_WORLD.getSize()} rank(s), rtol {args.rtol}")
    print(markdown_table(rows, ["solver", "iterations", "reason", "true_residual",
                                "setup_s", "solve_s", "total_s"]))
    for line in skipped:
        print(line)
problem.destroy()
