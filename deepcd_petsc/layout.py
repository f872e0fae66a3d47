"""Index arithmetic of a 3D DMDA decomposition: PETSc global numbering vs the
natural (lexicographic, x fastest) numbering, vectorised, without PETSc's AO
(which stores the whole mapping on every rank)."""
import numpy as np


class Layout:
    """Block decomposition of an nx×ny×nz grid over Px×Py×Pz ranks.

    `lx, ly, lz` are the per-rank sizes along each axis, as returned by
    ``DMDA.getOwnershipRanges()``; ranks are numbered x fastest, like PETSc.
    """

    def __init__(self, lx, ly, lz):
        self.l = [np.asarray(a, dtype=np.int64) for a in (lx, ly, lz)]
        self.start = [np.concatenate([[0], np.cumsum(a)]) for a in self.l]
        self.shape_xyz = tuple(int(s[-1]) for s in self.start)
        px, py, pz = (len(a) for a in self.l)
        self.procs = (px, py, pz)
        # number of cells owned by each rank, and the first PETSc index of each
        sizes = (self.l[2][:, None, None] * self.l[1][None, :, None]
                 * self.l[0][None, None, :]).ravel()
        self.offset = np.concatenate([[0], np.cumsum(sizes)])

    @classmethod
    def from_da(cls, da):
        """A 2D DMDA's layout is its flat 3D one: nz = 1, one rank along z."""
        ranges = tuple(da.getOwnershipRanges())
        return cls(*(ranges + ((1,),) * (3 - len(ranges))))

    def box(self, rank):
        """((xs, xe), (ys, ye), (zs, ze)) owned by `rank`."""
        px, py, _ = self.procs
        c = (rank % px, (rank // px) % py, rank // (px * py))
        return tuple((int(self.start[d][c[d]]), int(self.start[d][c[d] + 1]))
                     for d in range(3))

    def petsc_index(self, k, j, i):
        """PETSc global index of cells (k, j, i) (arrays, any shape)."""
        c, loc = [], []
        for d, v in enumerate((i, j, k)):
            v = np.asarray(v, dtype=np.int64)
            p = np.searchsorted(self.start[d], v, side="right") - 1
            c.append(p)
            loc.append(v - self.start[d][p])
        px, py, _ = self.procs
        rank = c[0] + px * (c[1] + py * c[2])
        nxl, nyl = self.l[0][c[0]], self.l[1][c[1]]
        return self.offset[rank] + loc[0] + nxl * (loc[1] + nyl * loc[2])

    def natural_index(self, p):
        """Natural index i + nx*(j + ny*k) of PETSc global indices `p`."""
        p = np.asarray(p, dtype=np.int64)
        rank = np.searchsorted(self.offset, p, side="right") - 1
        px, py, _ = self.procs
        cx, cy, cz = rank % px, (rank // px) % py, rank // (px * py)
        nxl, nyl = self.l[0][cx], self.l[1][cy]
        loc = p - self.offset[rank]
        il = loc % nxl
        jl = (loc // nxl) % nyl
        kl = loc // (nxl * nyl)
        i = self.start[0][cx] + il
        j = self.start[1][cy] + jl
        k = self.start[2][cz] + kl
        nx, ny, _ = self.shape_xyz
        return i + nx * (j + ny * k)


def flat_dmda(dm):
    """The 3D DMDA (nx, ny, 1) of a 2D DMDA: processor grid (px, py, 1),
    the same ownership ranges and periodic axes, so that cell (i, j)
    has the same global index in both (PETSc numbers a rank's block x
    fastest, then y, then z)."""
    nx, ny = dm.getSizes()
    px, py = dm.getProcSizes()
    lx, ly = dm.getOwnershipRanges()
    # only periodic axes matter (the network wraps them); a mirror or
    # ghosted boundary is in A's rows already (and 3D DMDAs refuse mirror
    # boundaries with a box stencil)
    from petsc4py import PETSc
    BT = PETSc.DM.BoundaryType
    bx, by = (b if b == BT.PERIODIC else BT.NONE for b in dm.getBoundaryType())
    return PETSc.DMDA().create(dim=3, sizes=(nx, ny, 1), proc_sizes=(px, py, 1), dof=1,
                               boundary_type=(bx, by, BT.NONE),
                               stencil_width=1, stencil_type=PETSc.DMDA.StencilType.BOX,
                               ownership_ranges=(tuple(lx), tuple(ly), (1,)), comm=dm.getComm())


class FlatView:
    """flat_dmda(dm) for the network's set-up, created only when something
    needs its vectors or ghost exchange: sizes, ranges, splits and boundary
    types come from the 2D DMDA as the flat one would give them. Creating
    a DMDA took ~30 ms at 1024² (0.4 s at 4096²), and a serial set-up from
    set_flags geometry needs none of it. destroy() frees the flat DMDA if
    one was made."""

    def __init__(self, dm):
        self.dm = dm
        self._da = None

    def __getattr__(self, name):          # anything else: the flat DMDA itself
        if self._da is None:
            self._da = flat_dmda(self.dm)
        return getattr(self._da, name)

    def getComm(self):
        return self.dm.getComm()

    def getDimension(self):
        return 3

    def getSizes(self):
        return tuple(self.dm.getSizes()) + (1,)

    def getProcSizes(self):
        return tuple(self.dm.getProcSizes()) + (1,)

    def getRanges(self):
        return tuple(self.dm.getRanges()) + ((0, 1),)

    def getCorners(self):
        (xs, ys), (xm, ym) = self.dm.getCorners()
        return (xs, ys, 0), (xm, ym, 1)

    def getOwnershipRanges(self):
        lx, ly = self.dm.getOwnershipRanges()
        return lx, ly, np.ones(1, dtype=lx.dtype)

    def getBoundaryType(self):
        from petsc4py import PETSc
        BT = PETSc.DM.BoundaryType
        return tuple(b if b == BT.PERIODIC else BT.NONE for b in self.dm.getBoundaryType()) \
            + (BT.NONE,)

    def destroy(self):
        if self._da is not None:
            self._da.destroy()
            self._da = None
