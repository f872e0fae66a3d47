"""Deflation of high-coefficient islands: one coarse vector per island.

Why: where a region's couplings are much stronger inside than across its
boundary (a bubble of the light phase, k = 1/ρ larger by 10³), the region's
indicator is a near-null vector of A, one per island. The network's
coarse levels aggregate fixed 2×2×2 blocks whatever the coefficients, so
they mix an island with its surroundings and leave these modes in the
error: density 64³ took 31–38 iterations where GAMG, whose aggregates
follow strong couplings, takes 18–33. Removing them by deflation (Tang &
Vuik's level-set deflation for bubbly flow; Saad's deflated CG) needs no
learning and is exact for the vectors deflated:

    x₀ = Z E⁺ Zᵀ b,   d ← d − Z E⁺ (AZ)ᵀ d for every direction,

with Z the islands' indicators (and boxes for the rest, with_boxes) and
E = ZᵀAZ (k × k, k vectors; E⁺ its pseudo-inverse). Then
Zᵀr = 0 stays (A-orthogonal directions keep it), and the form is
scale-free in d, so the network's output scale does not matter.

An island is a connected set of strong couplings (c ≥ THETA × the larger
of its two cells' largest couplings) with couplings inside it along all
of the grid's axes but one, or more (codimension one at most: in 3D a ball
or a layer, so the tall layers of graded cells are islands and
anisotropic cells' lines are not; in 2D a disc or a row, so the tall rows
of a 2D graded grid are), symmetric rows, a
mean inner coupling CONTRAST times its mean coupling across its boundary
(Dirichlet parts included) or more, and at most half the active cells.
Smooth fields (log-normal permeability) have no such region.

(AZ) is sparse: the vectors' rims and Dirichlet parts. Everything is read
off the rows of the stencil on this rank's block plus one ghost layer, so
any DMDA split gives the same islands, E and directions.
"""
import numpy as np
import torch

from . import kernels
from .stencil import FACES, _shift, ghost_layer

THETA = 0.25
CONTRAST = 10.0
MAX_ISLANDS = 512          # largest first; E is dense k × k
MAX_CANDIDATES = 1 << 16   # regions touching a contrast interface, before the tests
MAX_BOXES = 512            # boxes beside the islands: their size doubles until at most this many


class Islands:
    """This rank's part of the islands: `labels` (D, H, W), island index or −1."""

    def __init__(self, labels, count, found, cells, solid=0):
        self.labels, self.count, self.found, self.cells = labels, count, found, cells
        self.solid = solid      # of them, coupled inside along every axis (not layers)


def find(da, st, contrast=CONTRAST, theta=THETA, limit=MAX_ISLANDS):
    """Islands of the stencil `st` (this rank's block of the DMDA `da`), or
    None where no cell coupled strongly along two axes (one in 2D) sits beside a
    `contrast` jump or anisotropy (the common case: one reduction, no
    graph). Collective."""
    from mpi4py import MPI
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    comm = da.getComm().tompi4py()
    coef, diag = st.coef, st.diag
    shape = diag.shape
    grid_axes = tuple(n > 1 for n in da.getSizes()[::-1])          # (z, y, x) axes the grid has
    smax = coef.max(0)
    nb_smax = [_shift(ghost_layer(da, smax, 0.0), axis, step) for axis, step in FACES]
    # a coefficient jump (a cell's couplings `contrast` times its
    # neighbour's), or a coupling `contrast` times weaker than both its
    # cells' strongest (the layers of graded or anisotropic cells)
    jump = np.zeros(shape, bool)
    for f in range(6):
        c = coef[f] > 0
        jump |= c & (nb_smax[f] > 0) & (smax >= contrast * nb_smax[f])
        jump |= c & (contrast * coef[f] <= np.minimum(smax, nb_smax[f]))
    strong = [(coef[f] > 0) & (coef[f] >= theta * np.maximum(smax, nb_smax[f])) for f in range(6)]
    # an island's cells beside the jump are strongly coupled along all axes
    # but one (a line is not an island in 3D): aniso's z-lines stop here.
    # In 2D a row is: 2D cells stretched along y (1.08 per row, 128²) took
    # > 300 iterations with rows left alone, 15-29 with them deflated
    # (GAMG: 1437 to > 5000)
    along = sum((strong[2 * a] | strong[2 * a + 1]).astype(np.int8) for a in range(3))
    jump &= along >= max(1, sum(grid_axes) - 1)
    if not comm.allreduce(bool(jump.any()), op=MPI.LOR):
        return None
    active = (coef > 0).any(0)

    # components inside the block, then joined over the blocks' faces
    n = diag.size
    idx = np.arange(n).reshape(shape)
    rows, cols = [], []
    for f, (axis, step) in enumerate(FACES):
        if step < 0:
            continue       # each face once: strong from either of its rows
        inner = [slice(None)] * 3
        inner[axis] = slice(0, -1)
        inner = tuple(inner)
        m = strong[f][inner] | np.roll(strong[f - 1], -1, axis)[inner]
        rows.append(idx[inner][m])
        cols.append(np.roll(idx, -1, axis)[inner][m])
    r, c = np.concatenate(rows), np.concatenate(cols)
    ncomp, lab = connected_components(coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(n, n)),
                                      directed=False)
    # active cells only: number the local components of active cells
    used = np.zeros(ncomp, bool)
    used[lab[active.ravel()]] = True
    renum = np.full(ncomp, -1, np.int64)
    renum[used] = np.arange(int(used.sum()))
    lab = renum[lab].reshape(shape)
    nloc = int(used.sum())
    offset = comm.exscan(nloc) or 0
    total = comm.allreduce(nloc)
    gid = np.where(lab >= 0, lab + offset, -1)
    nb_gid = [_shift(ghost_layer(da, gid.astype(np.float64), -1.0), a, s).astype(np.int64)
              for a, s in FACES]
    pairs = []
    for f in range(6):
        m = strong[f] & (nb_gid[f] >= 0) & (nb_gid[f] != gid)
        pairs.append(np.stack([gid[m], nb_gid[f][m]]))
    pairs = np.concatenate(pairs, 1)
    if pairs.shape[1]:
        pairs = np.unique(pairs, axis=1)
    allp = np.concatenate(comm.allgather(pairs), 1)
    _, root = connected_components(coo_matrix((np.ones(allp.shape[1], np.int8), (allp[0], allp[1])),
                                              shape=(total, total)), directed=False)
    region = np.where(gid >= 0, root[np.maximum(gid, 0)], -1)
    nb_region = [np.where(g >= 0, root[np.maximum(g, 0)], -1) for g in nb_gid]

    # candidates: regions with a cell across a contrast jump from a neighbour
    cand = np.unique(region[jump & (region >= 0)])
    cand = np.unique(np.concatenate(comm.allgather(cand)))
    if cand.size > MAX_CANDIDATES:
        return Islands(None, 0, int(cand.size), 0)
    if cand.size == 0:
        return Islands(np.full(shape, -1, np.int64), 0, 0, 0)
    pos = np.minimum(np.searchsorted(cand, np.maximum(region, 0)), cand.size - 1)
    member = (region >= 0) & (cand[pos] == region)
    k0 = cand.size
    # per candidate: cells, inner coupling sum and count, rim (couplings
    # out and Dirichlet parts) sum and count, inner couplings along z, y, x
    stats = np.zeros((9, k0))
    stats[0] = np.bincount(pos[member], minlength=k0)
    excess = np.maximum(diag - coef.sum(0), 0.0)
    dmask = member & (excess > 1e-12 * smax)
    stats[3] += np.bincount(pos[dmask], excess[dmask], minlength=k0)
    stats[4] += np.bincount(pos[dmask], minlength=k0)
    for f, (axis, _) in enumerate(FACES):
        has = member & (coef[f] > 0)
        same = has & (nb_region[f] == region)
        out = has & (nb_region[f] != region)
        stats[1] += np.bincount(pos[same], coef[f][same], minlength=k0)
        stats[2] += np.bincount(pos[same], minlength=k0)
        stats[5 + axis] += np.bincount(pos[same], minlength=k0)
        stats[3] += np.bincount(pos[out], coef[f][out], minlength=k0)
        stats[4] += np.bincount(pos[out], minlength=k0)
        # rows that are not symmetric (PETSc's tutorials keep Dirichlet rows
        # as identity): deflation needs (AZ)ᵀd = ZᵀAd, so such regions are not
        # deflated (with them ex45 129×129×17 stalled)
        back = _shift(ghost_layer(da, coef[f ^ 1], 0.0), axis, FACES[f][1])
        odd = member & (np.abs(coef[f] - back) > 1e-10 * smax)
        stats[8] += np.bincount(pos[odd], minlength=k0)
    comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.SUM)
    cells, isum, icnt, osum, ocnt = stats[:5]
    nactive = comm.allreduce(int(active.sum()))
    ok = (ocnt > 0) & (icnt > 0) & (cells <= 0.5 * nactive)
    ok &= stats[8] == 0
    # couplings inside along all axes but one or more: in 3D a ball or a
    # layer, not a line
    axes = sum((stats[5 + a] > 0) for a in range(3) if grid_axes[a])
    ok &= axes >= max(1, sum(grid_axes) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok &= isum / np.maximum(icnt, 1) >= contrast * osum / np.maximum(ocnt, 1)
    chosen = np.flatnonzero(ok)
    found = int(chosen.size)
    chosen = chosen[np.argsort(-cells[chosen], kind="stable")][:limit]
    index = np.full(k0, -1, np.int64)
    index[chosen] = np.arange(chosen.size)
    labels = np.where(member, index[pos], -1).reshape(shape)
    return Islands(labels, int(chosen.size), found, int(cells[chosen].sum()),
                   int((axes[chosen] == sum(grid_axes)).sum()))


def with_boxes(da, isl, active, size):
    """(labels, count, size): the islands' vectors, then one per box of `size`³
    cells (global box grid) for the active cells outside the islands: the
    coarse space of Tang & Vuik's level-set-subdomain deflation. Why: the
    network's coarse levels aggregate islands with their surroundings, so
    their coarse operators are polluted by the islands' couplings and the
    smoothest modes of the rest converge slowly (density 64³ seed 9: 30
    iterations with the islands alone, 20 with 16³ boxes too; GAMG 23).
    Empty boxes are dropped; `size` doubles until there are at most
    MAX_BOXES (E is dense)."""
    from mpi4py import MPI
    comm = da.getComm().tompi4py()
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    nx, ny, nz = da.getSizes()
    nb = [-(-n // size) for n in (nz, ny, nx)]
    while int(np.prod(nb)) > MAX_BOXES:
        size *= 2
        nb = [-(-n // size) for n in (nz, ny, nx)]
    bz, by, bx = (np.arange(a, b) // size for a, b in ((zs, ze), (ys, ye), (xs, xe)))
    box = (bz[:, None, None] * nb[1] + by[None, :, None]) * nb[2] + bx[None, None, :]
    rest = active & (isl.labels < 0)
    counts = np.bincount(box[rest], minlength=int(np.prod(nb))).astype(np.int64)
    comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    compact = np.cumsum(counts > 0) - 1
    labels = np.where(rest, isl.count + compact[box], isl.labels)
    return labels, isl.count + int((counts > 0).sum()), size


class Deflation:
    """Z E⁺ Zᵀ and the projection d − Z E⁺ (AZ)ᵀ d on this rank's rows
    (float64 torch, in the DMDA block's order, as the Vecs' memory); Z has
    one vector per label (`labels`: −1 or 0 … count − 1 per cell)."""

    def __init__(self, da, st, labels, count):
        comm = da.getComm().tompi4py()
        self.mpi = comm if comm.Get_size() > 1 else None
        k = self.count = count
        flat = labels.ravel()
        nb = [_shift(ghost_layer(da, labels.astype(np.float64), -1.0), a, s).astype(np.int64).ravel()
              for a, s in FACES]
        coef = st.coef.reshape(6, -1)
        diag = st.diag.ravel()
        # (AZ)ᵀd per cell p: a face to a cell of another vector m adds
        # −c d_p to w[m] and +c d_p to w[l(p)] ("cross": p, m, c); the rest
        # of p's row, v = diag − Σ couplings to labelled cells (the Dirichlet
        # part, faces to unlabelled cells), adds v d_p to w[l(p)] ("own").
        # Inside a vector both vanish: a layer's cells hold two cross
        # entries, a box's inner cells none
        rows, cols, vals = [], [], []
        own = diag.copy()
        for f in range(6):
            lab_nb, c = nb[f], coef[f]
            own -= np.where(lab_nb >= 0, c, 0.0)
            x = np.flatnonzero((lab_nb >= 0) & (lab_nb != flat) & (c != 0))
            rows.append(x)
            cols.append(lab_nb[x])
            vals.append(c[x])
        rows, cols, vals = (np.concatenate(v) for v in (rows, cols, vals))
        order = np.argsort(rows, kind="stable")       # d read in order
        rows, cols, vals = rows[order], cols[order], vals[order]
        orows = np.flatnonzero((flat >= 0) & (np.abs(own) > 1e-12 * np.abs(diag)))
        ovals = own[orows]
        # E = ZᵀAZ from the same entries
        lr, lo = flat[rows], flat[orows]
        mine = lr >= 0
        e = np.zeros(k * k)      # (bincount of nothing is an int array)
        e -= np.bincount(lr[mine] * k + cols[mine], vals[mine], minlength=k * k)
        e += np.bincount(lr[mine] * (k + 1), vals[mine], minlength=k * k)
        e += np.bincount(lo * (k + 1), ovals, minlength=k * k)
        e = e.reshape(k, k)
        if self.mpi is not None:
            from mpi4py import MPI
            self.mpi.Allreduce(MPI.IN_PLACE, e, op=MPI.SUM)
        e = torch.as_tensor(0.5 * (e + e.T))
        # E⁺ (a pseudo-inverse): the vectors may span A's null space (a
        # closed box: islands and boxes cover it)
        lam, vec = torch.linalg.eigh(e)
        top = float(lam.abs().max()) if k else 0.0
        self.spd = k > 0 and float(lam.min()) >= -1e-10 * top
        inv = torch.where(lam > 1e-12 * top, 1.0 / lam, torch.zeros_like(lam))
        self.einv = (vec * inv) @ vec.T
        # int32 indices: 4 bytes per cell for Z, 16 per cross and 12 per own entry
        self.label = torch.as_tensor(flat.astype(np.int32))
        self.rows = torch.as_tensor(rows.astype(np.int32))
        self.cols = torch.as_tensor(cols.astype(np.int32))
        self.vals = torch.as_tensor(vals)
        self.orows = torch.as_tensor(orows.astype(np.int32))
        self.ovals = torch.as_tensor(ovals)
        self.nnz = int(rows.size + orows.size)
        self.lib = kernels.load()
        self.azt = self.cells = None
        if self.lib is None:       # torch: (AZ)ᵀ as a CSR matrix, one pass
            import warnings
            r = np.concatenate([rows, rows[mine], orows])
            c = np.concatenate([cols, lr[mine], lo])
            v = np.concatenate([-vals, vals[mine], ovals])
            with warnings.catch_warnings():   # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self.azt = torch.sparse_coo_tensor(
                    torch.as_tensor(np.stack([c, r])), torch.as_tensor(v),
                    (k, flat.size)).coalesce().to_sparse_csr()
            self.cells = torch.as_tensor(np.flatnonzero(flat >= 0))

    def energy(self):
        """E = ZᵀAZ (from E⁺; for tests and -ksp_view)."""
        return torch.linalg.pinv(self.einv, hermitian=True)

    def _solve(self, w):
        if self.mpi is not None:
            from mpi4py import MPI
            buf = w.numpy()
            self.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return self.einv @ w

    def coarse(self, r):
        """E⁺ Zᵀ r (global)."""
        cells = torch.nonzero(self.label >= 0)[:, 0]
        w = torch.zeros(self.count, dtype=torch.float64)
        w.index_add_(0, self.label[cells].long(), r[cells])
        return self._solve(w)

    def add(self, x, y, scale=1.0):
        """x += scale Z y."""
        if self.lib is not None:
            self.lib.deepcd_defl_scatter(self.label.numel(), self.label.data_ptr(),
                                         y.data_ptr(), scale, x.data_ptr())
        else:
            x.index_add_(0, self.cells, y[self.label[self.cells].long()], alpha=scale)

    def project(self, d):
        """d −= Z E⁺ (AZ)ᵀ d: A-orthogonal to every vector of Z."""
        if self.lib is not None:
            w = torch.zeros(self.count, dtype=torch.float64)
            self.lib.deepcd_defl_gather(self.rows.numel(), self.rows.data_ptr(),
                                        self.cols.data_ptr(), self.vals.data_ptr(),
                                        self.label.data_ptr(), self.orows.numel(),
                                        self.orows.data_ptr(), self.ovals.data_ptr(),
                                        d.data_ptr(), w.data_ptr())
        else:
            w = torch.mv(self.azt, d)
        self.add(d, self._solve(w).contiguous(), -1.0)
