"""Island deflation inside the training loss: the network is trained on
what the DCDM KSP asks of it.

Why: on operators with islands (density's bubbles, stretch's tall layers)
the KSP deflates them (islands.py): every residual the network sees has
Zᵀr = 0, and every direction it returns is projected, d = q − Z E⁺ZᵀAq.
The plain loss instead asks the network to resolve the islands'
near-null modes as well, which its fixed 2×2×2 aggregation cannot, and
which the KSP removes anyway. Here the sampled right-hand sides are
deflated (b ← b − AZ E⁺Zᵀb) and the output is projected before the loss,
with the islands, boxes and E that the KSP finds on the same operator
(a serial DMDA, so this needs petsc4py; the flag scenes and operators
without islands train as before).
"""
import numpy as np
import torch


def _serial_da(st):
    from petsc4py import PETSc
    nz, ny, nx = st.shape
    bt = [PETSc.DM.BoundaryType.PERIODIC if p else PETSc.DM.BoundaryType.NONE
          for p in st.periodic[::-1]]
    return PETSc.DMDA().create(dim=3, sizes=(nx, ny, nz), dof=1, stencil_width=1,
                               boundary_type=tuple(bt), stencil_type=PETSc.DMDA.StencilType.STAR,
                               comm=PETSc.COMM_SELF)


class TrainingDeflation:
    """Z (one label per cell, −1: none) and E⁺ of one training operator."""

    def __init__(self, labels, einv, islands, st):
        self.cells = torch.as_tensor(np.flatnonzero(labels >= 0))
        self.lab = torch.as_tensor(labels[labels >= 0].astype(np.int64))
        self.einv = torch.as_tensor(einv, dtype=torch.float64)
        self.count = einv.shape[0]
        self.islands = islands
        # the corrections A Z y are formed in float64: on graded cells E is
        # ill-conditioned (10⁷ in 2D stretch 128×32), y = E⁺Zᵀb is large and
        # b − AZy cancels; in float32 Zᵀr kept 5% of Zᵀb on stretch 64³
        from ..operator import StencilOperator
        self.op = StencilOperator(st)

    @classmethod
    def of(cls, st, box):
        """The KSP's deflation of the stencil `st` (islands, then `box`³
        boxes for the rest), or None where the KSP deflates nothing."""
        from .. import islands
        if st is None:
            return None
        da = _serial_da(st)
        try:
            found = islands.find(da, st)
            if found is None or not found.count:
                return None
            labels, count = found.labels, found.count
            if box:
                labels, count, _ = islands.with_boxes(da, found, st.active(), box)
            defl = islands.Deflation(da, st, labels, count)
            if not defl.spd:
                return None
            out = cls(labels.ravel(), defl.einv.numpy(), found.count, st)
            return out if out._exact() else None
        finally:
            da.destroy()

    def _exact(self, tol=1e-6):
        """Does the deflated residual of a random b have Zᵀr ≈ 0? Not where E
        is past float64 (2D cells stretched over 256 rows: E spans 10¹⁷):
        such an operator trains with the plain loss."""
        b = torch.randn(1, *self.op.shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
        zr = self._zt(self.residual(b))
        return bool(zr.abs().max() <= tol * self._zt(b).abs().max() * self.count)

    def to(self, device):
        self.cells, self.lab, self.einv = (t.to(device) for t in (self.cells, self.lab, self.einv))
        self.op = self.op.to(device=device)
        return self

    def _zt(self, v):
        """Zᵀ v per batch row: (B, k), float64."""
        flat = v.reshape(v.shape[0], -1).double()
        w = torch.zeros(v.shape[0], self.count, dtype=torch.float64, device=v.device)
        return w.index_add(1, self.lab, flat[:, self.cells])

    def _coarse(self, v):
        """E⁺ Zᵀ v per batch row."""
        return self._zt(v) @ self.einv

    def _spread(self, y, like):
        """Z y on the grid of `like`, float64."""
        flat = torch.zeros(like.shape[0], like[0].numel(), dtype=torch.float64, device=like.device)
        return flat.index_copy(1, self.cells, y[:, self.lab]).reshape(like.shape)

    def residual(self, b):
        """b − AZ E⁺Zᵀb, unit norm: a residual of the deflated KSP (Zᵀr = 0)."""
        r = (b.double() - self.op(self._spread(self._coarse(b), b))).to(b.dtype)
        dims = tuple(range(1, r.dim()))
        return r / r.square().sum(dims, keepdim=True).sqrt().clamp_min(1e-30)

    def project(self, q):
        """q − Z E⁺ZᵀAq: the KSP's direction, A-orthogonal to Z (gradients
        flow through the float64 correction)."""
        return q - self._spread(self._coarse(self.op(q.double())), q).to(q.dtype)
