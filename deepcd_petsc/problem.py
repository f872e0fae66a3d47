"""Cell-centred pressure Poisson systems on a 3D DMDA: assembly, right-hand
sides and null spaces, vectorised per rank."""
import numpy as np

from .errors import UserError
from .layout import Layout
from .coefficients import FAMILIES, family
from .scenes import AIR, FLUID, SOLID, load_npy, make_flags, padded, remove_isolated_fluid

# (axis in (k, j, i) order, step) for the six face neighbours
NEIGHBOURS = ((0, -1), (0, 1), (1, -1), (1, 1), (2, -1), (2, 1))


def parse_shape(n=None, shape=None, dim=3):
    """(nx, ny, nz) from --n N or --shape NX,NY,NZ, validated; a 2D grid
    (--dim 2, or --shape NX,NY) has nz = 1."""
    if dim not in (2, 3):
        raise UserError(f"--dim {dim}: use 2 or 3")
    if shape is not None:
        parts = str(shape).split(",")
        if len(parts) not in (2, 3) or (dim == 2 and len(parts) != 2):
            raise UserError(f"--shape {shape!r}: expected NX,NY,NZ (3D) or NX,NY (2D)")
        vals = parts
    elif n is not None:
        vals = [n] * dim
    else:
        raise UserError("give the grid size with --n N or --shape NX,NY,NZ (NX,NY in 2D)")
    out = []
    for v in vals:
        try:
            iv = int(str(v).strip())
        except ValueError:
            raise UserError(f"grid size {v!r} is not an integer") from None
        if iv < 4:
            raise UserError(f"grid size {iv} is too small: every dimension must be >= 4")
        out.append(iv)
    return tuple(out) + (1,) * (3 - len(out))


def _local(pf, box):
    (xs, xe), (ys, ye), (zs, ze) = box
    return pf[zs:ze + 2, ys:ye + 2, xs:xe + 2]


def _shift(a, axis, step):
    """Neighbour values of the interior of a ghosted array."""
    sl = [slice(1, -1)] * 3
    sl[axis] = slice(1 + step, a.shape[axis] - 1 + step)
    return a[tuple(sl)]


def assemble_csr(pflags_local, box, layout, trans=None, periodic=(False, False, False)):
    """Local rows of A as CSR (indptr, PETSc column indices, values).

    Fluid row: diagonal = Σ T over non-solid face neighbours, −T per fluid
    neighbour, T the face transmissibility (`trans` (6, zm, ym, xm) in
    stencil.FACES order; 1 without: the unit operator). Other rows: unit
    diagonal, decoupled. `periodic` (z, y, x): neighbours wrap.
    """
    (xs, xe), (ys, ye), (zs, ze) = box
    f = pflags_local[1:-1, 1:-1, 1:-1]
    fluid = f == FLUID
    k, j, i = np.meshgrid(np.arange(zs, ze), np.arange(ys, ye),
                          np.arange(xs, xe), indexing="ij")
    n = fluid.size
    cols = np.empty((n, 7), np.int64)
    vals = np.zeros((n, 7))
    mask = np.zeros((n, 7), bool)
    cols[:, 0] = layout.petsc_index(k, j, i).ravel()
    diag = np.zeros(f.shape)
    sizes = layout.shape_xyz[::-1]
    for c, (axis, step) in enumerate(NEIGHBOURS, start=1):
        nb = _shift(pflags_local, axis, step)
        t = 1.0 if trans is None else trans[c - 1]
        diag += (nb != SOLID) * t
        link = (fluid & (nb == FLUID)).ravel()
        idx = [k, j, i]
        idx[axis] = idx[axis] + step
        if periodic[axis]:
            idx[axis] = idx[axis] % sizes[axis]
        cols[link, c] = layout.petsc_index(*(a.ravel()[link] for a in idx))
        vals[link, c] = -(np.broadcast_to(t, f.shape).ravel()[link])
        mask[:, c] = link
    vals[:, 0] = np.where(fluid, diag, 1.0).ravel()
    mask[:, 0] = True
    # sort columns within each row (PETSc prefers it)
    key = np.where(mask, cols, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, 1)
    vals = np.take_along_axis(vals, order, 1)
    mask = np.take_along_axis(mask, order, 1)
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(PETScInt())
    return indptr, cols[mask].astype(PETScInt()), vals[mask]


def PETScInt():
    from petsc4py import PETSc
    return PETSc.IntType


def closed_regions(flags, open_faces):
    """Labels of connected fluid regions with no air neighbour and no open
    face: each one adds a constant vector to the null space of A."""
    from scipy import ndimage
    labels, count = ndimage.label(flags == FLUID)
    p = padded(flags, open_faces)
    air_nb = np.zeros(flags.shape, bool)
    for axis, step in NEIGHBOURS:
        air_nb |= _shift(p, axis, step) == AIR
    vented = np.unique(labels[air_nb & (flags == FLUID)])
    closed = np.setdiff1d(np.arange(1, count + 1), vented)
    return labels, closed


class Problem:
    """A scene's pressure system on a DMDA: `da`, `A`, `b` (PETSc objects)."""

    def __init__(self, flags, open_faces=(), comm=None, proc_sizes=None,
                 seed=0, rhs_file=None, coefficients=None):
        from petsc4py import PETSc
        self.flags = flags
        self.open_faces = set(open_faces)
        self.coefficients = coefficients
        self.periodic = coefficients.periodic if coefficients is not None else (False,) * 3
        nz, ny, nx = flags.shape
        self.shape = (nx, ny, nz)
        comm = comm or PETSc.COMM_WORLD
        bt = PETSc.DM.BoundaryType
        # nz = 1: a 2D DMDA (5-point operator), numbered as its flat 3D view
        dim = 2 if nz == 1 else 3
        self.da = PETSc.DMDA().create(
            dim=dim, sizes=(nx, ny, nz)[:dim], dof=1,
            proc_sizes=tuple(proc_sizes or (PETSc.DECIDE,) * 3)[:dim],
            boundary_type=tuple(bt.PERIODIC if p else bt.NONE for p in self.periodic[::-1])[:dim],
            stencil_type=PETSc.DMDA.StencilType.BOX, stencil_width=1,
            comm=comm, setup=False)
        self.da.setInterpolationType(PETSc.DMDA.InterpolationType.Q0)
        self.da.setUp()
        self.layout = Layout.from_da(self.da)
        self.box = tuple(tuple(r) for r in self.da.getRanges()) + ((0, 1),) * (3 - dim)
        pglobal = padded(flags, self.open_faces, self.periodic)
        self.pflags = _local(pglobal, self.box)
        self.trans = None
        if coefficients is not None:
            (xs, xe), (ys, ye), (zs, ze) = self.box
            self.trans = coefficients.face_transmissibilities(pglobal)[:, zs:ze, ys:ye, xs:xe]
        self.A = self._assemble()
        self.nullspace = self._nullspace()
        if self.nullspace is not None:
            self.A.setNullSpace(self.nullspace)
        self.b = self._rhs(seed, rhs_file)

    @classmethod
    def from_scene(cls, scene, shape_xyz, seed=0, flags_file=None,
                   open_faces=None, **kw):
        nx, ny, nz = shape_xyz
        if scene in FAMILIES:
            flags, faces, coef = family(scene, (nz, ny, nx), seed, kw.pop("contrast", None))
            if open_faces is not None:
                faces = set(open_faces)
            return cls(remove_isolated_fluid(flags, faces), faces, seed=seed, coefficients=coef, **kw)
        kw.pop("contrast", None)
        flags, faces = make_flags(scene, (nz, ny, nx), seed, flags_file, open_faces)
        return cls(flags, faces, seed=seed, **kw)

    @property
    def local_flags(self):
        """Flags of the owned block, (zm, ym, xm)."""
        return self.pflags[1:-1, 1:-1, 1:-1]

    def _assemble(self):
        from petsc4py import PETSc
        indptr, cols, vals = assemble_csr(self.pflags, self.box, self.layout, self.trans,
                                          self.periodic)
        nloc, N = len(indptr) - 1, int(np.prod(self.shape))
        A = PETSc.Mat().createAIJ(size=((nloc, N), (nloc, N)),
                                  csr=(indptr, cols, vals),
                                  comm=self.da.getComm())
        A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        A.setOption(PETSc.Mat.Option.SYMMETRY_ETERNAL, True)
        A.assemble()
        return A

    def _nullspace(self):
        from petsc4py import PETSc
        labels, closed = closed_regions(self.flags, self.open_faces)
        if len(closed) == 0:
            self.A.setOption(PETSc.Mat.Option.SPD, True)
            self.closed_regions = 0
            return None
        self.closed_regions = len(closed)
        (xs, xe), (ys, ye), (zs, ze) = self.box
        loc = labels[zs:ze, ys:ye, xs:xe]
        counts = np.bincount(labels.ravel(), minlength=labels.max() + 1)
        vecs = []
        for lab in closed:
            v = self.da.createGlobalVec()
            with v as arr:          # restores the array and increases the state
                arr.reshape(loc.shape)[...] = (loc == lab) / np.sqrt(counts[lab])
            vecs.append(v)
        return PETSc.NullSpace().create(vectors=vecs, comm=self.da.getComm())

    def _rhs(self, seed, rhs_file):
        b = self.da.createGlobalVec()
        # written through `with`: PETSc 3.26 does not see writes through a
        # bare getArray() (b.norm() returned the cached norm of the zeros)
        with b as barr:
            arr = barr.reshape(self.local_flags.shape)
            if rhs_file is not None:
                arr[...] = self._load_rhs(rhs_file)
            else:
                arr[...] = divergence_rhs(self.pflags, self.box, self.shape, seed)
            arr[self.local_flags != FLUID] = 0.0
        norm0 = b.norm()
        if self.nullspace is not None:
            self.nullspace.remove(b)
        if b.norm() <= 1e-12 * norm0 or norm0 == 0.0:
            raise UserError("the right-hand side is zero on every fluid cell (or lies in the null space "
                            "of a closed region): the solution is x = 0")
        return b

    def _load_rhs(self, path):
        nx, ny, nz = self.shape
        arr = load_npy(path, "right-hand-side file")
        if arr.shape != (nz, ny, nx):
            raise UserError(f"right-hand-side file {path!r} has shape {arr.shape}; expected (nz, ny, nx) = {(nz, ny, nx)}")
        if not np.issubdtype(arr.dtype, np.number):
            raise UserError(f"right-hand-side file {path!r} has non-numeric dtype {arr.dtype}")
        (xs, xe), (ys, ye), (zs, ze) = self.box
        loc = np.asarray(arr[zs:ze, ys:ye, xs:xe], dtype=float)
        if not np.isfinite(loc).all():
            raise UserError(f"right-hand-side file {path!r} contains NaN or Inf")
        return loc

    def true_residual(self, x):
        """‖b − A x‖ / ‖b‖."""
        r = self.b.duplicate()
        self.A.mult(x, r)
        r.aypx(-1.0, self.b)
        out = r.norm() / self.b.norm()
        r.destroy()
        return out

    def to_natural(self, vec):
        """Whole field as a (nz, ny, nx) array on rank 0 (None elsewhere)."""
        from petsc4py import PETSc
        nat = self.da.createNaturalVec()
        self.da.globalToNatural(vec, nat)
        scatter, seq = PETSc.Scatter.toZero(nat)
        scatter.scatter(nat, seq, False, PETSc.Scatter.Mode.FORWARD)
        out = None
        if self.da.getComm().getRank() == 0:
            nx, ny, nz = self.shape
            out = seq.getArray(readonly=True).reshape(nz, ny, nx).copy()
        for o in (scatter, seq, nat):
            o.destroy()
        return out

    def destroy(self):
        for o in (self.b, self.A, self.nullspace, self.da):
            if o is not None:
                o.destroy()


def velocity_modes(seed, count=6, kmax=3):
    """Random low-wavenumber Fourier modes of a smooth velocity field."""
    rng = np.random.default_rng([seed, 271828])
    modes = []
    for comp in range(3):
        ks = rng.integers(-kmax, kmax + 1, size=(count, 3))
        ks[np.all(ks == 0, axis=1), comp] = 1
        modes.append((ks, rng.normal(size=count), rng.uniform(0, 2 * np.pi, count)))
    return modes


def _field(modes, x, y, z):
    ks, amp, ph = modes
    out = 0.0
    for (kx, ky, kz), a, p in zip(ks, amp, ph):
        out = out + a * np.sin(2 * np.pi * (kx * x + ky * y + kz * z) + p)
    return out


def divergence_rhs(pflags_local, box, shape_xyz, seed):
    """b = −div u for a smooth random velocity u sampled on cell faces, with
    zero flux through solid faces: a pressure-projection right-hand side."""
    (xs, xe), (ys, ye), (zs, ze) = box
    nx, ny, nz = shape_xyz
    modes = velocity_modes(seed)
    open_ = pflags_local != SOLID
    xc = (np.arange(xs, xe) + 0.5) / nx
    yc = (np.arange(ys, ye) + 0.5) / ny
    zc = (np.arange(zs, ze) + 0.5) / nz
    xf = np.arange(xs, xe + 1) / nx
    yf = np.arange(ys, ye + 1) / ny
    zf = np.arange(zs, ze + 1) / nz
    inner = open_[1:-1, 1:-1, 1:-1]
    # x faces: (zm, ym, xm+1)
    u = _field(modes[0], xf[None, None, :], yc[None, :, None], zc[:, None, None])
    u = u * (open_[1:-1, 1:-1, :-1] & open_[1:-1, 1:-1, 1:])
    v = _field(modes[1], xc[None, None, :], yf[None, :, None], zc[:, None, None])
    v = v * (open_[1:-1, :-1, 1:-1] & open_[1:-1, 1:, 1:-1])
    w = _field(modes[2], xc[None, None, :], yc[None, :, None], zf[:, None, None])
    w = w * (open_[:-1, 1:-1, 1:-1] & open_[1:, 1:-1, 1:-1])
    div = (u[:, :, 1:] - u[:, :, :-1]) + (v[:, 1:, :] - v[:, :-1, :]) \
        + (w[1:, :, :] - w[:-1, :, :])
    return np.where(inner, -div, 0.0)
