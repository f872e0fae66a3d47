"""The network as a PETSc preconditioner:

    -ksp_type fcg -pc_type python -pc_python_type deepcd_petsc.NetworkPC

y = f(x) is not a fixed SPD preconditioner (the learned pre- and
post-smoothers differ; U-Net models are nonlinear too), so use it with the
flexible methods fcg, gcr, fgmres (pipefcg, pipegcr too); gcr or fgmres
when the operator itself is not symmetric. Plain CG assumes a fixed SPD
preconditioner and may stall: it gets a warning.
"""
import sys

from .context import NetworkContext
from .errors import reported

FLEXIBLE = {"fcg", "pipefcg", "gcr", "pipegcr", "fgmres", "fbcgsr", "python"}


class NetworkPC(NetworkContext):
    kind = "pc"

    def __init__(self):
        super().__init__()
        self.warned = False
        self.ksp_type = None

    @reported
    def setFromOptions(self, pc):
        self.read_options(pc)

    @reported
    def setUp(self, pc):
        A, _ = pc.getOperators()
        self.setup_network(pc, A)

    def reset(self, pc):
        self.reset_network()

    def destroy(self, pc):
        self.reset_network()

    @reported
    def view(self, pc, viewer):
        viewer.printfASCII("  DCDM network as a variable (non-symmetric) preconditioner: "
                           "use with fcg, gcr or fgmres\n")
        self.view_network(viewer)

    @reported
    def preSolve(self, pc, ksp, b, x):
        t = ksp.getType()
        self.ksp_type = t
        if t not in FLEXIBLE and not self.warned:
            self.warned = True
            if ksp.getComm().getRank() == 0:
                print(f"deepcd_petsc.NetworkPC warning: KSP {t!r} assumes a fixed SPD preconditioner; "
                      "the network is not, and may stall it. Use -ksp_type fcg, gcr or fgmres.",
                      file=sys.stderr, flush=True)

    @reported
    def apply(self, pc, x, y):
        if self.evaluator is None:
            self.setUp(pc)
        n = x.norm()
        if n == 0.0 or n != n:
            x.copy(y)   # zero stays zero; NaN propagates to the KSP's own checks
            return
        s = self.apply_network(x, y, scale=1.0 / n)
        # f approximates c·A⁻¹ for an unknown c of either sign; flexible
        # Krylov methods want xᵀPx > 0, so orient y along x
        y.scale(1.0 / s if y.dot(x) >= 0 else -1.0 / s)
