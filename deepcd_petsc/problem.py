"""Cell-centred pressure Poisson systems on a 3D DMDA: assembly, right-hand
sides and null spaces, vectorised per rank. Problem.from_scene builds each
rank's block of the scene and its operator from the seed alone, and labels
closed regions across ranks (label_regions): no rank holds a whole-grid
array."""
import numpy as np

from .errors import UserError
from .layout import Layout
from .coefficients import FAMILIES, family
from .scenes import (AIR, FLUID, SOLID, finish_block, load_npy, padded, scene_block,
                     window_indices)

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


def label_regions(da, pflags):
    """Connected fluid regions of the whole grid, labelled across ranks:
    (keys, closed, counts). keys (zm, ym, xm) float: one value per region
    on every rank it touches (NaN off fluid); closed: the sorted keys of
    regions with no air neighbour and no open face (each adds a constant
    vector to A's null space), counts their cell counts, the same on every
    rank. `pflags`: the rank's flags with one ghost layer (air beyond open
    faces, the neighbours' cells across rank boundaries, wrapped on
    periodic axes as the DMDA wraps). Per rank: scipy.ndimage.label of the
    block; then each local region's key (global id = the ranks' offset +
    local label, minus a bias for regions with air, so that a region's
    minimum is biased iff any of its parts is vented) is lowered to the
    smallest key across its block faces, exchanged through the DMDA's
    ghosts, until no key changes anywhere: as many exchanges as blocks a
    region crosses in a line, with O(block surface) work each."""
    if da.getDimension() == 2:      # its flat 3D view: the same numbering
        from .layout import flat_dmda
        flat = flat_dmda(da)
        try:
            return label_regions(flat, pflags)
        finally:
            flat.destroy()
    from mpi4py import MPI
    from scipy import ndimage
    comm = da.getComm().tompi4py()
    f = pflags[1:-1, 1:-1, 1:-1]
    fluid = f == FLUID
    lab, n = ndimage.label(fluid)
    offset = comm.exscan(n) or 0
    total = comm.allreduce(n)
    air_nb = np.zeros(f.shape, bool)
    for axis, step in NEIGHBOURS:
        air_nb |= _shift(pflags, axis, step) == AIR
    vented = np.zeros(n + 1, bool)
    vented[lab[air_nb & fluid]] = True
    bias = float(total + 1)
    key = np.empty(n + 1)
    key[0] = np.inf
    key[1:] = offset + np.arange(1, n + 1) - bias * vented[1:]
    # the block's face cells whose ghost neighbour is fluid: (their label,
    # the neighbour's position in the local (ghosted) Vec)
    (gxs, gys, gzs), (gxm, gym, gzm) = da.getGhostCorners()
    (xs, ys, zs), (xm, ym, zm) = da.getCorners()
    o = np.array([zs - gzs, ys - gys, xs - gxs])
    own, ghost, face = [], [], []
    for axis, step in NEIGHBOURS:
        sl = [slice(None)] * 3
        sl[axis] = -1 if step > 0 else 0
        sl = tuple(sl)
        nb = _shift(pflags, axis, step)[sl]
        m = fluid[sl] & (nb == FLUID)
        if not m.any():
            continue
        idx = np.nonzero(m)
        cells = [np.asarray(v) for v in idx]
        cells.insert(axis, np.full(len(idx[0]), f.shape[axis] - 1 if step > 0 else 0))
        gpos = [c + oo for c, oo in zip(cells, o)]
        gpos[axis] = gpos[axis] + step
        own.append(lab[tuple(cells)])
        ghost.append(np.ravel_multi_index(gpos, (gzm, gym, gxm)))
        face.append(np.ravel_multi_index(cells, f.shape))
    own = np.concatenate(own) if own else np.zeros(0, np.int64)
    ghost = np.concatenate(ghost) if ghost else np.zeros(0, np.int64)
    face = np.unique(np.concatenate(face)) if face else np.zeros(0, np.int64)
    face_lab = lab.ravel()[face]
    g, loc = da.createGlobalVec(), da.createLocalVec()
    try:
        while True:
            with g as ga:
                ga[face] = key[face_lab]
            da.globalToLocal(g, loc)
            new = key.copy()
            np.minimum.at(new, own, loc.getArray(readonly=True)[ghost])
            changed = bool((new < key).any())
            key = new
            if not comm.allreduce(changed, op=MPI.LOR):
                break
    finally:
        g.destroy()
        loc.destroy()
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    mine = {}
    for c in np.nonzero(key[1:] >= 0)[0] + 1:
        mine[key[c]] = mine.get(key[c], 0) + int(sizes[c])
    merged = {}
    for part in comm.allgather(mine):
        for kk, cnt in part.items():
            merged[kk] = merged.get(kk, 0) + cnt
    closed = np.array(sorted(merged))
    counts = np.array([merged[kk] for kk in closed], dtype=np.int64)
    key[0] = np.nan
    return key[lab], closed, counts


class Problem:
    """A scene's pressure system on a DMDA: `da`, `A`, `b` (PETSc objects).
    Problem(flags, ...): from the whole grid's flags, the same on every rank
    (small problems, tests); Problem.from_scene: each rank builds only its
    block."""

    def __init__(self, flags, open_faces=(), comm=None, proc_sizes=None,
                 seed=0, rhs_file=None, coefficients=None):
        self._flags = flags
        nz, ny, nx = flags.shape
        periodic = coefficients.periodic if coefficients is not None else (False,) * 3

        def block(box):
            pglobal = padded(flags, set(open_faces), periodic)
            trans = None
            if coefficients is not None:
                (xs, xe), (ys, ye), (zs, ze) = box
                trans = coefficients.face_transmissibilities(pglobal)[:, zs:ze, ys:ye, xs:xe]
            return _local(pglobal, box), trans
        self._build((nx, ny, nz), open_faces, comm, proc_sizes, seed, rhs_file,
                    coefficients, periodic, block)

    def _build(self, shape_xyz, open_faces, comm, proc_sizes, seed, rhs_file, coefficients,
               periodic, block):
        """The DMDA, then this rank's flags with one ghost layer and face
        transmissibilities from `block(box)`, the matrix, null space, rhs."""
        from petsc4py import PETSc
        self.open_faces = set(open_faces)
        self.coefficients = coefficients
        self.periodic = tuple(periodic)
        nx, ny, nz = self.shape = tuple(shape_xyz)
        comm = comm or PETSc.COMM_WORLD
        self.ranks = comm.getSize()
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
        self.A = self.nullspace = self.b = None
        try:
            self.layout = Layout.from_da(self.da)
            self.box = tuple(tuple(r) for r in self.da.getRanges()) + ((0, 1),) * (3 - dim)
            self.pflags, self.trans = _collective(comm, block, self.box)
            if not comm.tompi4py().allreduce(bool((self.local_flags == FLUID).any()),
                                             op=__import__("mpi4py").MPI.LOR):
                raise UserError("the domain has no fluid cell: nothing to solve")
            self.A = self._assemble()
            self.nullspace = self._nullspace()
            if self.nullspace is not None:
                self.A.setNullSpace(self.nullspace)
            self.b = self._rhs(seed, rhs_file)
        except BaseException:
            self.destroy()
            raise

    @classmethod
    def from_scene(cls, scene, shape_xyz, seed=0, flags_file=None,
                   open_faces=None, comm=None, proc_sizes=None, rhs_file=None, contrast=None):
        """A scene's problem, each rank generating only its block (and the
        ghost layers its rows need) from the seed: the same matrix, rhs
        and null space as the whole-grid scene on any number of ranks."""
        nx, ny, nz = shape_xyz
        shape = (nz, ny, nx)
        if scene in FAMILIES:
            _, fam_faces, coef = family(scene, shape, seed, contrast, axes=[[0]] * 3)
            coef.k = None       # the block's k lives in its transmissibilities
            # the family's open face: z+ in 3D, y+ in 2D (a z+ there would
            # make every cell of the single layer a Dirichlet cell)
            faces = set(fam_faces) if open_faces is None else set(open_faces)
            periodic = coef.periodic

            def block(box):
                from mpi4py import MPI
                mpi = (comm or _world()).tompi4py()
                win = window_indices(shape, box, 2, periodic)
                axes = [w[0] for w in win]
                raw, _, c = family(scene, shape, seed, contrast, axes=axes,
                                   allmax=lambda v: mpi.allreduce(v, op=MPI.MAX))
                pflags = finish_block(raw, [w[1] for w in win], faces, periodic)
                c.k = c.k[1:-1, 1:-1, 1:-1]
                return pflags, c.block_transmissibilities(pflags, [a[1:-1] for a in axes])
        else:
            # the scene's open faces (and its errors: unknown scene, bad
            # file header), from a one-cell block
            faces = _collective(comm or _world(), scene_block, scene, shape, seed, ((0, 1),) * 3,
                                flags_file, open_faces)[1]
            coef, periodic = None, (False,) * 3

            def block(box):
                return scene_block(scene, shape, seed, box, flags_file, faces)[0], None
        self = cls.__new__(cls)
        self._flags = None
        self._build((nx, ny, nz), faces, comm, proc_sizes, seed, rhs_file, coef, periodic, block)
        return self

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

    @property
    def flags(self):
        """The whole grid's flags (nz, ny, nx): those given, or gathered
        from every rank's block: collective, O(global) on every rank, for
        small problems and tests; set-up and solve use local_flags."""
        if self._flags is None:
            if self.ranks == 1:        # (also after destroy())
                return self.local_flags
            nx, ny, nz = self.shape
            whole = np.empty((nz, ny, nx), np.int8)
            for box, blk in self.da.getComm().tompi4py().allgather((self.box, self.local_flags)):
                (xs, xe), (ys, ye), (zs, ze) = box
                whole[zs:ze, ys:ye, xs:xe] = blk
            return whole
        return self._flags

    def local_stencil(self):
        """This rank's block of A as a stencil.Stencil (diagonal and six
        couplings per cell), from the flags and face transmissibilities."""
        from .stencil import FACES, Stencil
        fluid = self.local_flags == FLUID
        diag = np.zeros(fluid.shape)
        coef = np.zeros((6,) + fluid.shape)
        for f, (axis, step) in enumerate(FACES):
            nb = _shift(self.pflags, axis, step)
            t = 1.0 if self.trans is None else self.trans[f]
            diag += np.where(fluid & (nb != SOLID), t, 0.0)
            coef[f] = np.where(fluid & (nb == FLUID), t, 0.0)
        return Stencil(np.where(fluid, diag, 1.0), coef, self.periodic)

    def _nullspace(self):
        from petsc4py import PETSc
        keys, closed, counts = label_regions(self.da, self.pflags)
        self.closed_regions = len(closed)
        if len(closed) == 0:
            self.A.setOption(PETSc.Mat.Option.SPD, True)
            return None
        vecs = []
        for key, count in zip(closed, counts):
            v = self.da.createGlobalVec()
            with v as arr:          # restores the array and increases the state
                arr.reshape(keys.shape)[...] = (keys == key) / np.sqrt(count)
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


def _world():
    from petsc4py import PETSc
    return PETSc.COMM_WORLD


def _collective(comm, fn, *args):
    """fn(*args) on every rank; an error on one rank is raised on all (with
    its message), so that none waits in a collective the others left."""
    from .errors import raise_on_all
    err, out = None, None
    try:
        out = fn(*args)
    except UserError as e:
        err = str(e)
    raise_on_all(comm.tompi4py(), err, UserError)
    return out


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
