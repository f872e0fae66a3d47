#!/usr/bin/env python3
"""DCDM from petsc4py: your own DMDA, matrix and right-hand side, the DCDM
KSP (or the network as a PC for FCG), geometry handed over with set_flags.

    python examples/dcdm_petsc4py.py --n 48
    mpiexec -n 2 python examples/dcdm_petsc4py.py --n 48 -ksp_monitor
    python examples/dcdm_petsc4py.py --n 48 --pc      # FCG + NetworkPC

Any -options go to PETSc (they override what this script sets).
"""
import argparse
import sys

import petsc4py

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--n", type=int, default=48)
ap.add_argument("--pc", action="store_true", help="FCG with the network as preconditioner")
args, rest = ap.parse_known_args()
petsc4py.init([sys.argv[0]] + rest)
from petsc4py import PETSc  # noqa: E402

import deepcd_petsc  # noqa: E402
from deepcd_petsc.petsc_compat import set_dm_inactive  # noqa: E402
from deepcd_petsc.problem import Problem  # noqa: E402
from deepcd_petsc.scenes import make_flags  # noqa: E402

# An application's geometry: a liquid pool with obstacles (any int8 array
# (nz, ny, nx) with 0 fluid / 1 solid / 2 air would do, e.g. np.load(...)).
n = args.n
flags, open_faces = make_flags("liquid", (n, n, n), seed=11)
problem = Problem(flags, open_faces, seed=11)   # DMDA + assembled A + b

ksp = PETSc.KSP().create(problem.da.getComm())
ksp.setOperators(problem.A)
ksp.setDM(problem.da)
set_dm_inactive(ksp)            # A and b are ours; the DMDA only describes the grid
                                # (KSPSetDMActive false; its signature changed in 3.25)
if args.pc:
    ksp.setType("fcg")
    pc = ksp.getPC()
    pc.setType("python")
    pc.setPythonContext(deepcd_petsc.NetworkPC())
else:
    ksp.setType("python")
    ksp.setPythonContext(deepcd_petsc.DCDM())
ksp.setTolerances(rtol=1e-6)
ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
ksp.setFromOptions()
deepcd_petsc.set_flags(ksp, flags, open_faces)  # optional: else derived from A

x = problem.b.duplicate()
ksp.solve(problem.b, x)
res = problem.true_residual(x)
if problem.da.getComm().getRank() == 0:
    print(f"{ksp.getType()}{' + NetworkPC' if args.pc else ''} on {n}^3 liquid, "
          f"{problem.da.getComm().getSize()} rank(s): {ksp.getIterationNumber()} iterations, "
          f"reason {ksp.getConvergedReason()}, true residual {res:.2e}")
ksp.view()
# Destroy every handle to a Python-typed KSP/PC before exit (PETSc 3.18 can
# crash when the garbage collector does it after PetscFinalize)
if args.pc:
    pc.destroy()
ksp.destroy()
x.destroy()
problem.destroy()
