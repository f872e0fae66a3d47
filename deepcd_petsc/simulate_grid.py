"""The MAC grid of `deepcd simulate` on DMDAs, one block per rank.

Arrays are (z, y, x) with z up. Velocity component a (0 = w, 1 = v, 2 = u)
lives on the faces normal to array axis a: sample I of component a sits at
I + 0.5 on every axis but a, at I on axis a. All components share one
(nz+1, ny+1, nx+1) DMDA with dof 3, split like the cell DMDA (the last rank
along an axis owns one more face); slots with I_b = n_b on an axis b != a
are not faces: they hold a copy of their neighbour (fill_slots) so stencils
near the top walls need no special cases. Cell scalars and the pressure have
their own DMDAs with the same split.

Ghost width bounds the semi-Lagrangian backtrace: the departure point of
a sample is at most cfl cells away and trilinear interpolation reads one
more cell on top of the half-cell stagger, so width ceil(cfl + 0.5) + 1
covers it; the caller clamps the time step to that CFL. Beyond the domain
the ghosted arrays are padded with their edge value (velocity, scalars) or
zero (pressure: Dirichlet p = 0 beyond an open face).
"""
import math

import numpy as np
from scipy.ndimage import map_coordinates

from .errors import UserError
from .layout import Layout
from .problem import _local, label_regions
from .scenes import FLUID, SOLID, padded

UNIT = np.eye(3, dtype=int)


def ghost_width(cfl):
    """Ghost cells a backtrace of `cfl` cells needs (see module docstring)."""
    return int(math.ceil(cfl + 0.5)) + 1


class Ghosted:
    """Global/local Vec pair of a DMDA: numpy block in, padded ghosted
    block out (the ghost exchange of a stencil)."""

    def __init__(self, da, dof, pad_mode):
        self.da, self.dof, self.pad_mode = da, dof, pad_mode
        self.gvec = da.createGlobalVec()
        self.lvec = da.createLocalVec()
        (gxs, gys, gzs), (gxm, gym, gzm) = da.getGhostCorners()
        self.shape = (gzm, gym, gxm) + ((dof,) if dof > 1 else ())
        self.origin = (gzs - 1, gys - 1, gxs - 1)   # global index of padded [0, 0, 0]

    def exchange(self, own):
        with self.gvec as a:
            a[...] = own.ravel()
        self.da.globalToLocal(self.gvec, self.lvec)
        arr = self.lvec.getArray(readonly=True).reshape(self.shape)
        pad = [(1, 1)] * 3 + ([(0, 0)] if self.dof > 1 else [])
        return np.pad(arr, pad, mode=self.pad_mode)

    def destroy(self):
        self.gvec.destroy()
        self.lvec.destroy()


def _da(sizes, dof, width, ranges, comm):
    from petsc4py import PETSc
    da = PETSc.DMDA().create(
        dim=3, sizes=sizes, dof=dof, proc_sizes=tuple(len(r) for r in ranges),
        ownership_ranges=ranges, stencil_type=PETSc.DMDA.StencilType.BOX,
        stencil_width=width, comm=comm, setup=False)
    da.setUp()
    return da


class Grid:
    """The three DMDAs, this rank's cell and face boxes, and the stencils."""

    def __init__(self, shape_xyz, cfl, comm):
        from petsc4py import PETSc
        nx, ny, nz = shape_xyz
        self.n = (nz, ny, nx)
        self.dx = 1.0 / max(shape_xyz)
        self.ghost = ghost_width(cfl)
        self.dap = PETSc.DMDA().create(
            dim=3, sizes=(nx, ny, nz), dof=1, stencil_width=1,
            stencil_type=PETSc.DMDA.StencilType.BOX, comm=comm, setup=False)
        self.dap.setInterpolationType(PETSc.DMDA.InterpolationType.Q0)
        self.dap.setUp()
        lx, ly, lz = (list(map(int, r)) for r in self.dap.getOwnershipRanges())
        small = min(min(lx), min(ly), min(lz))
        if small < self.ghost:
            size = comm.getSize()
            self.dap.destroy()
            raise UserError(f"grid {nx}x{ny}x{nz} on {size} rank(s) gives a block {small} cells wide; "
                            f"the backtrace at --cfl {cfl} needs >= {self.ghost}: use a larger grid, "
                            "fewer ranks or a smaller --cfl")
        self.das = _da((nx, ny, nz), 1, self.ghost, (lx, ly, lz), comm)
        plus = [l[:-1] + [l[-1] + 1] for l in (lx, ly, lz)]
        self.daf = _da((nx + 1, ny + 1, nz + 1), 3, self.ghost, plus, comm)
        self.layout = Layout.from_da(self.dap)
        self.box_xyz = tuple(tuple(int(v) for v in r) for r in self.dap.getRanges())
        self.cbox = self.box_xyz[::-1]
        self.fbox = tuple((s, e + (e == n)) for (s, e), n in zip(self.cbox, self.n))
        self.U = Ghosted(self.daf, 3, "edge")
        self.Q = Ghosted(self.das, 1, "edge")
        self.P = Ghosted(self.dap, 1, "constant")
        self.comm = comm

    # -- index helpers ------------------------------------------------------
    def cshape(self):
        return tuple(e - s for s, e in self.cbox)

    def fshape(self):
        return tuple(e - s for s, e in self.fbox) + (3,)

    def index(self, box, axis):
        """Global indices along `axis` of `box`, broadcastable over it."""
        shape = [1, 1, 1]
        shape[axis] = -1
        return np.arange(*box[axis]).reshape(shape)

    def coords(self, box, axis, offset):
        """Positions (in cells) of samples along `axis`."""
        return (self.index(box, axis) + offset) * self.dx

    @staticmethod
    def shifted(G, origin, box, shift):
        """G over `box` moved by `shift` cells (G padded, origin its [0, 0, 0])."""
        return G[tuple(slice(s - o + d, e - o + d) for (s, e), o, d in zip(box, origin, shift))]

    def valid(self, a):
        """Mask over the face box: slots that are faces of component a."""
        m = np.ones(self.fshape()[:3], bool)
        for b in range(3):
            if b != a:
                m &= self.index(self.fbox, b) < self.n[b]
        return m

    def fill_slots(self, U):
        """Non-face slots (I_b = n_b, b != a) copy their neighbour: an edge
        value for stencils and interpolation at the top walls."""
        for a in range(3):
            for b in range(3):
                if b != a and self.fbox[b][1] == self.n[b] + 1:
                    src = [slice(None)] * 3
                    dst = [slice(None)] * 3
                    src[b], dst[b] = -2, -1
                    U[tuple(dst) + (a,)] = U[tuple(src) + (a,)]
        return U

    # -- stencils -------------------------------------------------------------
    def face_velocity(self, G, a, b):
        """Component b at the faces of component a (own face box)."""
        sh = lambda d: self.shifted(G, self.U.origin, self.fbox, d)[..., b]  # noqa: E731
        if a == b:
            return sh((0, 0, 0))
        ea, eb = -UNIT[a], UNIT[b]
        return 0.25 * (sh((0, 0, 0)) + sh(ea) + sh(eb) + sh(ea + eb))

    def cell_velocity(self, G, b):
        """Component b at the cell centres (own cell box)."""
        sh = lambda d: self.shifted(G, self.U.origin, self.cbox, d)[..., b]  # noqa: E731
        return 0.5 * (sh((0, 0, 0)) + sh(UNIT[b]))

    def flux_sum(self, G):
        """Net outflow of every own cell (div u · dx), from ghosted faces."""
        out = np.zeros(self.cshape())
        for a in range(3):
            out += self.shifted(G, self.U.origin, self.cbox, UNIT[a])[..., a]
            out -= self.shifted(G, self.U.origin, self.cbox, (0, 0, 0))[..., a]
        return out

    def _sample(self, field, origin, box, vel, dt, limits):
        """Semi-Lagrangian value at I - dt·vel (trilinear), departure
        clamped to the samples [0, limits) of each axis."""
        c = dt / self.dx
        coords = []
        for b in range(3):
            s = self.index(box, b) - c * vel[b]
            coords.append(np.clip(s, 0, limits[b] - 1) - origin[b])
        coords = np.broadcast_arrays(*coords)
        return map_coordinates(field, coords, order=1, mode="nearest", prefilter=False)

    def advect_velocity(self, G, dt):
        """New own face velocities (Euler backtrace from each face)."""
        U = np.empty(self.fshape())
        for a in range(3):
            vel = [self.face_velocity(G, a, b) for b in range(3)]
            limits = [self.n[b] + (b == a) for b in range(3)]
            U[..., a] = self._sample(np.ascontiguousarray(G[..., a]), self.U.origin,
                                     self.fbox, vel, dt, limits)
        return self.fill_slots(U)

    def advect_scalar(self, Gq, G, dt):
        """New own cell values of a scalar (ghosted Gq)."""
        vel = [self.cell_velocity(G, b) for b in range(3)]
        return self._sample(Gq, self.Q.origin, self.cbox, vel, dt, self.n)

    # -- boundary faces -------------------------------------------------------
    def face_sides(self, P, a):
        """Flags of the two cells beside every face of component a: P is
        the padded global flag array (origin -1)."""
        lo = self.shifted(P, (-1, -1, -1), self.fbox, -UNIT[a])
        hi = self.shifted(P, (-1, -1, -1), self.fbox, (0, 0, 0))
        return lo, hi

    def boundary(self, P, a):
        """(solid faces, faces the pressure moves, domain-boundary faces) of
        component a: solid when either side is solid; the pressure moves
        faces between two non-solid cells."""
        lo, hi = self.face_sides(P, a)
        valid = self.valid(a)
        solid = valid & ((lo == SOLID) | (hi == SOLID))
        wall = (self.index(self.fbox, a) == 0) | (self.index(self.fbox, a) == self.n[a])
        return solid, valid & ~solid, np.broadcast_to(wall, solid.shape)

    def project(self, U, p_ghost, moved):
        """U_a -= p[I] - p[I - e_a] on the faces the pressure moves (p is the
        scaled pressure dt·p/(ρ·dx); zero beyond an open face)."""
        for a in range(3):
            grad = self.shifted(p_ghost, self.P.origin, self.fbox, (0, 0, 0)) \
                - self.shifted(p_ghost, self.P.origin, self.fbox, -UNIT[a])
            U[..., a] -= np.where(moved[a], grad, 0.0)
        return self.fill_slots(U)

    def extrapolate(self, U, known, sweeps):
        """Fill unknown faces (liquid: faces away from the liquid) with the
        mean of their known neighbours, one layer per sweep, so the
        backtrace from the surface reads plausible velocities."""
        U = np.where(known, U, np.nan)
        for _ in range(sweeps):
            G = self.U.exchange(self.fill_slots(U))
            total = np.zeros(U.shape)
            count = np.zeros(U.shape)
            for a in range(3):
                for s in (-1, 1):
                    nb = self.shifted(G, self.U.origin, self.fbox, s * UNIT[a])
                    ok = ~np.isnan(nb)
                    total += np.where(ok, nb, 0.0)
                    count += ok
            fill = np.isnan(U) & (count > 0)
            U[fill] = total[fill] / count[fill]
        return self.fill_slots(np.nan_to_num(U, nan=0.0))

    # -- the pressure system --------------------------------------------------
    def _pattern(self):
        """Column indices of the full 7-point pattern of the own rows, each
        row sorted (PETSc's preference), and that sort: computed once, so a
        new operator costs only its values (problem.assemble_csr, which
        builds the same matrix, computes them again for every geometry)."""
        if getattr(self, "_cols", None) is None:
            from .problem import NEIGHBOURS
            k, j, i = np.meshgrid(*(np.arange(*r) for r in self.cbox), indexing="ij")
            cols = np.full((k.size, 7), -1, np.int64)
            cols[:, 0] = self.layout.petsc_index(k, j, i).ravel()
            for c, (axis, step) in enumerate(NEIGHBOURS, start=1):
                idx = [k, j, i]
                idx[axis] = idx[axis] + step
                inside = (idx[axis] >= 0) & (idx[axis] < self.n[axis])
                cols[inside.ravel(), c] = self.layout.petsc_index(
                    *(a[inside] for a in idx))
            key = np.where(cols < 0, np.iinfo(np.int64).max, cols)
            order = np.argsort(key, axis=1, kind="stable")
            self._cols = np.take_along_axis(cols, order, 1)
            self._order = (order + 7 * np.arange(len(order))[:, None]).ravel()  # flat: one take
        return self._cols, self._order

    def _csr(self, pflags):
        """(indptr, columns, values) of the unit operator of problem.py:
        fluid row: diagonal = non-solid face neighbours, -1 per fluid
        neighbour; other rows: unit diagonal."""
        from petsc4py import PETSc
        from .problem import NEIGHBOURS, _shift
        cols, order = self._pattern()
        f = pflags[1:-1, 1:-1, 1:-1]
        fluid = (f == FLUID).ravel()
        vals = np.zeros(cols.shape)
        diag = np.zeros(fluid.shape)
        for c, (axis, step) in enumerate(NEIGHBOURS, start=1):
            nb = _shift(pflags, axis, step).ravel()
            diag += nb != SOLID
            vals[:, c] = -1.0 * (fluid & (nb == FLUID))
        vals[:, 0] = np.where(fluid, diag, 1.0)
        vals = vals.ravel().take(order).reshape(cols.shape)
        keep = vals != 0
        indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(PETSc.IntType)
        return indptr, cols[keep].astype(PETSc.IntType), vals[keep]

    def operator(self, flags, open_faces):
        """The pressure matrix of these cell flags (the unit 7-point
        operator of `deepcd solve`, problem.assemble_csr) and its null
        space (one constant per closed fluid region), or None."""
        from petsc4py import PETSc
        pflags = _local(padded(flags, open_faces), self.box_xyz)
        indptr, cols, vals = self._csr(pflags)
        nloc, N = len(indptr) - 1, int(np.prod(self.n))
        A = PETSc.Mat().createAIJ(size=((nloc, N), (nloc, N)), csr=(indptr, cols, vals),
                                  comm=self.comm)
        A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        A.setOption(PETSc.Mat.Option.SYMMETRY_ETERNAL, True)
        A.assemble()
        ns = self._nullspace(pflags)
        if ns is None:
            A.setOption(PETSc.Mat.Option.SPD, True)
        else:
            A.setNullSpace(ns)
        return A, ns

    def _nullspace(self, pflags):
        """One constant per closed fluid region, labelled across ranks
        (problem.label_regions) from this rank's ghosted flags."""
        from petsc4py import PETSc
        keys, closed, counts = label_regions(self.dap, pflags)
        if len(closed) == 0:
            return None
        vecs = []
        for key, count in zip(closed, counts):
            v = self.dap.createGlobalVec()
            with v as arr:
                arr[...] = ((keys == key) / np.sqrt(count)).ravel()
            vecs.append(v)
        ns = PETSc.NullSpace().create(vectors=vecs, comm=self.comm)
        for v in vecs:
            v.destroy()
        return ns

    def own(self, arr):
        """This rank's cell block of a global (nz, ny, nx) array."""
        return arr[tuple(slice(*r) for r in self.cbox)]

    def gather(self, block, dtype):
        """The global (nz, ny, nx) array of everyone's cell blocks, on every
        rank (int8 flags: n³ bytes, once per step of a liquid)."""
        comm = self.comm.tompi4py()
        out = np.empty(self.n, dtype)
        for box, b in comm.allgather((self.cbox, np.ascontiguousarray(block, dtype))):
            out[tuple(slice(*r) for r in box)] = b
        return out

    def to_root(self, block):
        """The global array of a cell scalar on rank 0 (None elsewhere)."""
        from petsc4py import PETSc
        g = self.Q.gvec
        with g as a:
            a[...] = block.ravel()
        nat = self.das.createNaturalVec()
        self.das.globalToNatural(g, nat)
        scatter, seq = PETSc.Scatter.toZero(nat)
        scatter.scatter(nat, seq, False, PETSc.Scatter.Mode.FORWARD)
        out = None
        if self.comm.getRank() == 0:
            out = seq.getArray(readonly=True).reshape(self.n).copy()
        for o in (scatter, seq, nat):
            o.destroy()
        return out

    def destroy(self):
        for o in (self.U, self.Q, self.P, self.daf, self.das, self.dap):
            o.destroy()
