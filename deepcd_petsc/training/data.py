"""Training data: per geometry, Lanczos Ritz vectors of the scene operator;
training vectors are random combinations weighted toward the low spectrum.

Cache format (one file per geometry, `<scene>-<nx>x<ny>x<nz>-s<seed>-m<m>.npz`):
  flags          int8 (nz, ny, nx), 0 fluid / 1 solid / 2 air
  open_faces     str, comma list (e.g. "z+")
  ritz_values    float64 (k,), ascending, null space dropped
  ritz_vectors   float32 (k, n_fluid), over fluid cells in natural order
  stencil        float64 (7, nz, ny, nx), operator families only: diagonal
                 and the six couplings (stencil.FACES order)
  periodic       int8 (3,), (z, y, x) periodic axes (operator families)
"""
import os

import numpy as np
import torch

from ..operator import operator_of
from ..coefficients import scene_operator
from ..scenes import FLUID
from .lanczos import lanczos_ritz


class Geometry:
    """One scene instance with its Ritz basis."""

    def __init__(self, flags, open_faces, ritz_values, ritz_vectors, name="", stencil=None):
        self.flags = flags
        self.stencil = stencil          # stencil.Stencil of an operator family, else None
        self.open_faces = set(open_faces)
        self.ritz_values = ritz_values
        self.ritz_vectors = torch.from_numpy(np.ascontiguousarray(ritz_vectors))
        self.fluid_idx = torch.from_numpy(np.flatnonzero(flags.ravel() == FLUID))
        self.name = name
        self._op = None
        from ..model import dirichlet_fraction
        self.dirichlet = torch.from_numpy(dirichlet_fraction(flags, self.open_faces)).float()

    @property
    def op(self):
        if self._op is None:
            self._op = operator_of(self.flags, self.open_faces, self.stencil, torch.float32)
        return self._op

    @property
    def prepare_kw(self):
        """MGNet.prepare's operator arguments for this geometry."""
        return {} if self.stencil is None else self.stencil.network_kw()

    def sample(self, batch, gen, low_fraction=0.5, low_weight=9.0):
        """Unit-norm vectors b = Σ c_j q_j, c ~ N(0,1), the lowest
        `low_fraction` of the Ritz spectrum weighted by `low_weight`;
        returned on the full grid, (batch, nz, ny, nx), zero off-fluid."""
        k = self.ritz_vectors.shape[0]
        c = torch.randn(batch, k, generator=gen)
        c[:, :int(low_fraction * k)] *= low_weight
        b = c @ self.ritz_vectors
        b /= b.norm(dim=1, keepdim=True)
        full = torch.zeros(batch, self.flags.size)
        full[:, self.fluid_idx] = b
        return full.reshape(batch, *self.flags.shape)


def cache_name(scene, shape, seed, m):
    nz, ny, nx = shape
    return f"{scene}-{nx}x{ny}x{nz}-s{seed}-m{m}.npz"


def make_geometry(scene, shape, seed, m, cache_dir=None):
    """Geometry for (scene, shape (nz, ny, nx), seed) with m Lanczos steps,
    read from or written to `cache_dir`."""
    path = os.path.join(cache_dir, cache_name(scene, shape, seed, m)) if cache_dir else None
    name = f"{scene}/s{seed}"
    if path and os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            faces = [f for f in str(z["open_faces"]).split(",") if f]
            st = None
            if "stencil" in z.files:
                from ..stencil import Stencil
                st = Stencil.from_packed(z["stencil"], tuple(bool(v) for v in z["periodic"]))
            return Geometry(z["flags"], faces, z["ritz_values"], z["ritz_vectors"], name, st)
    flags, faces, st = scene_operator(scene, shape, seed)
    op = operator_of(flags, faces, st, torch.float64)
    idx = np.flatnonzero(flags.ravel() == FLUID)
    full = torch.zeros(flags.size, dtype=torch.float64)

    def matvec(v):
        full[idx] = torch.from_numpy(v)
        return op(full.reshape(flags.shape)).reshape(-1)[idx].numpy().copy()

    rng = np.random.default_rng([seed, 314159])
    vals, vecs = lanczos_ritz(matvec, len(idx), m, rng)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        extra = {} if st is None else {
            "stencil": st.packed(),
            "periodic": np.array(st.periodic, dtype=np.int8)}
        np.savez(tmp, flags=flags, open_faces=",".join(sorted(faces)),
                 ritz_values=vals, ritz_vectors=vecs, **extra)
        os.replace(tmp, path)
    return Geometry(flags, faces, vals, vecs, name, st)
