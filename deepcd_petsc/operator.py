"""The scene's Poisson operator matrix-free in torch, equal to the assembled
PETSc matrix (tests/test_operator.py): used for training (batched, any
device) and for the torch reference DCDM in `deepcd evaluate`."""
import numpy as np
import torch
import torch.nn.functional as F

from .scenes import FLUID, SOLID, padded


class PoissonOperator:
    """A for flags (D, H, W) with open faces: fluid rows -diag/-1 stencil,
    non-fluid rows identity. Applies to (..., D, H, W) tensors."""

    def __init__(self, flags, open_faces=(), dtype=torch.float64, device=None):
        flags = np.asarray(flags)
        p = padded(flags, set(open_faces)) != SOLID
        diag = (p[:-2, 1:-1, 1:-1].astype(np.int8) + p[2:, 1:-1, 1:-1]
                + p[1:-1, :-2, 1:-1] + p[1:-1, 2:, 1:-1]
                + p[1:-1, 1:-1, :-2] + p[1:-1, 1:-1, 2:])
        fluid = flags == FLUID
        self.shape = flags.shape
        self.fluid = torch.as_tensor(fluid, device=device)
        self.fluid_f = self.fluid.to(dtype)
        self.diag = torch.as_tensor(np.where(fluid, diag, 1).astype(np.float64),
                                    device=device).to(dtype)

    def to(self, dtype=None, device=None):
        self.fluid = self.fluid.to(device=device)
        self.fluid_f = self.fluid_f.to(dtype=dtype, device=device)
        self.diag = self.diag.to(dtype=dtype, device=device)
        return self

    def __call__(self, x):
        shp = x.shape
        x5 = x.reshape(-1, 1, *self.shape)
        xf = x5 * self.fluid_f.to(x.dtype)
        p = F.pad(xf, (1, 1, 1, 1, 1, 1))
        nb = (p[..., :-2, 1:-1, 1:-1] + p[..., 2:, 1:-1, 1:-1]
              + p[..., 1:-1, :-2, 1:-1] + p[..., 1:-1, 2:, 1:-1]
              + p[..., 1:-1, 1:-1, :-2] + p[..., 1:-1, 1:-1, 2:])
        y = self.diag.to(x.dtype) * x5 - nb * self.fluid_f.to(x.dtype)
        return y.reshape(shp)


class StencilOperator:
    """A of a stencil.Stencil (whole grid) in torch, periodic axes wrapped:
    the operator families' counterpart of PoissonOperator (training,
    Lanczos). Applies to (..., D, H, W) tensors."""

    def __init__(self, st, dtype=torch.float64, device=None):
        from .mgnet import wrap_pad
        self.shape = st.shape
        self.wrap = wrap_pad(st.periodic)
        self.diag = torch.as_tensor(st.diag, device=device).to(dtype)
        self.coef = torch.as_tensor(st.coef, device=device).to(dtype)[None]

    def to(self, dtype=None, device=None):
        self.diag = self.diag.to(dtype=dtype, device=device)
        self.coef = self.coef.to(dtype=dtype, device=device)
        return self

    def __call__(self, x):
        from .mgnet import coupled_sum
        shp = x.shape
        x5 = x.reshape(-1, 1, *self.shape)
        y = self.diag.to(x.dtype) * x5 - coupled_sum(x5, self.coef.to(x.dtype), self.wrap)
        return y.reshape(shp)


def operator_of(flags, faces, st, dtype=torch.float64, device=None):
    """The torch operator of a scene: the flags' unit operator, or an
    operator family's stencil (st not None)."""
    if st is None:
        return PoissonOperator(flags, faces, dtype=dtype, device=device)
    return StencilOperator(st, dtype=dtype, device=device)
