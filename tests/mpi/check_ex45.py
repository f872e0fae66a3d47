"""Run under mpiexec: PETSc's tutorial ex45 system (Dirichlet rows kept,
geometry derived from the operator in parallel) with DCDM; rank 0 prints
`EX45 <ranks> <iterations> <reason> <true relative residual>`."""
import os
import sys

from mpisetup import PETSc, comm, size  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from helpers import ex45_system  # noqa: E402
from deepcd_petsc.petsc_compat import set_dm_inactive  # noqa: E402

da, A, b = ex45_system(int(sys.argv[1]) if len(sys.argv) > 1 else 33, comm)
opts = PETSc.Options()
for k, v in {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM", "ksp_rtol": "1e-6"}.items():
    opts[k] = v
ksp = PETSc.KSP().create(comm)
ksp.setOperators(A)
ksp.setDM(da)
set_dm_inactive(ksp)
ksp.setFromOptions()
x = b.duplicate()
x.set(0.0)
ksp.solve(b, x)
r = b.duplicate()
A.mult(x, r)
r.aypx(-1.0, b)
res = r.norm() / b.norm()
reason = ksp.getConvergedReason()
its = ksp.getIterationNumber()
ksp.destroy()
if comm.getRank() == 0:
    print(f"EX45 {size} {its} {reason} {res:.3e}", flush=True)
for o in (r, x, b, A, da):
    o.destroy()
