"""Coefficient families of the operator-aware scenes: cell-centred finite
volumes of −div(k grad p) on a (possibly graded) grid, with harmonic face
coefficients. Each family is a pure function of (shape, seed), like the
flag scenes, evaluated at any cells' global indices: a rank builds its own
block of the operator.

Scale: with k = 1 and unit spacing every face transmissibility is 1, so a
family reduces to the unit-coefficient operator of the flag scenes.
"""
import numpy as np

from .scenes import FAMILY_SCENES as FAMILIES, FLUID, _add_sphere


class Coefficients:
    """k per cell (nz, ny, nx), spacings hz (nz), hy (ny), hx (nx), and
    periodic axes (z, y, x)."""

    def __init__(self, k, hz, hy, hx, periodic=(False, False, False)):
        self.k = np.asarray(k, dtype=float)
        self.h = tuple(np.asarray(a, dtype=float) for a in (hz, hy, hx))
        self.periodic = tuple(periodic)

    def face_transmissibilities(self, pflags):
        """(6, nz, ny, nx): T of each cell's faces in stencil.FACES order.
        Faces to a fluid neighbour: harmonic k over the centre distance
        times the face area; to a non-fluid cell or beyond the grid (open
        faces, air): the cell's own k over one spacing, as the unit
        operator counts them. `pflags`: flags with one ghost layer (wrapped
        on periodic axes)."""
        kp = np.pad(self.k, 1, mode="edge")
        for axis in range(3):
            if self.periodic[axis]:
                kp = _wrap(kp, axis)
        hg = [np.pad(h, 1, mode="edge") for h in self.h]
        for axis in range(3):
            if self.periodic[axis]:
                hg[axis][0], hg[axis][-1] = self.h[axis][-1], self.h[axis][0]
        return _transmissibilities(kp, hg, pflags)

    def block_transmissibilities(self, pflags, axes):
        """face_transmissibilities of one rank's block: self.k holds k on
        the block with one ghost layer, at the global indices `axes` (z,
        y, x) that scenes.window_indices(..., 1) gives (clipped: the edge
        padding; wrapped on periodic axes); the same values as the
        whole-grid call there."""
        return _transmissibilities(self.k, [h[a] for h, a in zip(self.h, axes)], pflags)


def _transmissibilities(kp, hg, pflags):
    """The faces' T from k and the spacings with one ghost layer."""
    from .stencil import FACES
    k = kp[1:-1, 1:-1, 1:-1]
    h = [g[1:-1] for g in hg]
    out = np.zeros((6,) + k.shape)
    for f, (axis, step) in enumerate(FACES):
        others = [a for a in range(3) if a != axis]
        area = _bcast(h[others[0]], others[0]) * _bcast(h[others[1]], others[1])
        h_self = _bcast(h[axis], axis)
        h_nb = _bcast(hg[axis][1 + step:len(hg[axis]) - 1 + step], axis)
        k_nb = _shift(kp, axis, step)
        nb_fluid = _shift(pflags, axis, step) == FLUID
        harm = 2 * k * k_nb / (k + k_nb)
        t_fluid = harm * area / (0.5 * (h_self + h_nb))
        t_wall = k * area / h_self
        out[f] = np.where(nb_fluid, t_fluid, t_wall)
    return out


def _bcast(a, axis):
    shape = [1, 1, 1]
    shape[axis] = -1
    return np.asarray(a).reshape(shape)


def _shift(a, axis, step):
    sl = [slice(1, -1)] * 3
    sl[axis] = slice(1 + step, a.shape[axis] - 1 + step)
    return a[tuple(sl)]


def _wrap(p, axis):
    """Ghost layers of a padded array taken from the opposite side."""
    p = np.moveaxis(p.copy(), axis, 0)
    p[0], p[-1] = p[-2], p[1]
    return np.moveaxis(p, 0, axis)


def _smooth_field(shape, rng, modes=24, kmax=4, axes=None, allmax=float):
    """A smooth random field of unit maximum modulus (random Fourier
    modes), at the cells of `axes` (global (z, y, x) indices; all by
    default); `allmax`: the maximum over all ranks' cells."""
    from .scenes import _centres
    z, y, x = _centres(shape, axes)
    g = np.zeros((len(z), len(y), len(x)))
    for _ in range(modes):
        kz, ky, kx = rng.integers(-kmax, kmax + 1, 3)
        amp = rng.normal() / (1 + kz * kz + ky * ky + kx * kx) ** 0.5
        ph = rng.uniform(0, 2 * np.pi)
        g += amp * (np.sin(2 * np.pi * kz * z + ph)[:, None, None]
                    * np.cos(2 * np.pi * ky * y + ph)[None, :, None]
                    * np.cos(2 * np.pi * kx * x - ph)[None, None, :])
    return g / max(allmax(float(np.abs(g).max(initial=0.0))), 1e-30)


def family(name, shape, seed, contrast=None, axes=None, allmax=float):
    """(flags, open faces, Coefficients) of a family's scene; `contrast`:
    density ratio (density), decades (perm), cell aspect hx/hz (aniso),
    growth per layer (stretch). `axes`: only the cells at those global
    (z, y, x) indices (a rank's block and halo; flags and k on them, the
    spacings stay whole: 1D); `allmax` then takes the maximum over the
    ranks (perm's normalisation)."""
    from .scenes import _axes, _empty
    rng = np.random.default_rng([seed, 4242])
    nz, ny, nx = shape
    if nz == 1:
        return _family2d(name, shape, rng, contrast, axes, allmax)
    flags = _empty(shape, axes)
    k = np.ones(flags.shape)
    hz, hy, hx = np.ones(nz), np.ones(ny), np.ones(nx)
    periodic = (False, False, False)
    if name == "density":
        # bubbles of the light phase (k = 1/ρ larger by the density ratio)
        ratio = 1000.0 if contrast is None else float(contrast)
        bubbles = _empty(shape, axes)
        for _ in range(rng.integers(4, 12)):
            r = rng.uniform(0.06, 0.16)
            _add_sphere(bubbles, rng.uniform(0.15, 0.85, 3), r, axes, shape)
        k = np.where(bubbles == 1, ratio, 1.0)
    elif name == "perm":
        decades = 4.0 if contrast is None else float(contrast)
        k = 10.0 ** (0.5 * decades * _smooth_field(shape, rng, axes=axes, allmax=allmax))
    elif name == "aniso":
        aspect = 4.0 if contrast is None else float(contrast)
        hz = np.full(nz, 1.0 / aspect)
    elif name == "stretch":
        growth = 1.08 if contrast is None else float(contrast)
        hz = growth ** np.arange(nz)
        hz = hz / hz[0]
    elif name == "periodic":
        periodic = (False, True, True)
        for _ in range(rng.integers(3, 8)):
            _add_sphere(flags, (rng.uniform(0.15, 0.7), rng.uniform(0, 1), rng.uniform(0, 1)),
                        rng.uniform(0.06, 0.14), axes, shape)
    else:
        raise ValueError(name)
    return flags, {"z+"}, Coefficients(k, hz, hy, hx, periodic)


def _family2d(name, shape, rng, contrast, axes=None, allmax=float):
    """The 2D version of a family on (1, ny, nx), y up (open top y+): the
    strong or graded axis is y, the periodic one x, obstacles are discs;
    at the cells of `axes` as in 3D."""
    from .scenes import _empty
    _, ny, nx = shape
    flags = _empty(shape, axes)
    k = np.ones(flags.shape)
    hy, hx = np.ones(ny), np.ones(nx)
    periodic = (False, False, False)
    if name == "density":
        ratio = 1000.0 if contrast is None else float(contrast)
        bubbles = _empty(shape, axes)
        for _ in range(rng.integers(4, 12)):
            _add_sphere(bubbles, (0.5, *rng.uniform(0.15, 0.85, 2)), rng.uniform(0.06, 0.16), axes, shape)
        k = np.where(bubbles == 1, ratio, 1.0)
    elif name == "perm":
        decades = 4.0 if contrast is None else float(contrast)
        k = 10.0 ** (0.5 * decades * _smooth_field(shape, rng, axes=axes, allmax=allmax))
    elif name == "aniso":
        hy = np.full(ny, 1.0 / (4.0 if contrast is None else float(contrast)))
    elif name == "stretch":
        hy = (1.08 if contrast is None else float(contrast)) ** np.arange(ny)
    elif name == "periodic":
        periodic = (False, False, True)
        for _ in range(rng.integers(3, 8)):
            _add_sphere(flags, (0.5, rng.uniform(0.15, 0.7), rng.uniform(0, 1)),
                        rng.uniform(0.06, 0.14), axes, shape)
    else:
        raise ValueError(name)
    return flags, {"y+"}, Coefficients(k, np.ones(1), hy, hx, periodic)


def scene_operator(scene, shape, seed):
    """(flags, open faces, whole-grid stencil.Stencil or None) of a flag
    scene or an operator family, for torch-only use (training, evaluate).
    A 2D flag scene gets its flags' unit stencil, as DCDM gives a 2D DMDA
    (context._flat_stencil: Galerkin coarse levels), so that training and
    evaluation see the network PETSc runs."""
    from .scenes import make_flags, padded, remove_isolated_fluid
    if scene in FAMILIES:
        from .stencil import from_coefficients
        flags, faces, coef = family(scene, shape, seed)
        flags = remove_isolated_fluid(flags, faces, coef.periodic)
        return flags, faces, from_coefficients(flags, faces, coef)
    flags, faces = make_flags(scene, shape, seed)
    if shape[0] == 1:
        from .stencil import from_flags
        return flags, faces, from_flags(flags, padded(flags, faces))
    return flags, faces, None
