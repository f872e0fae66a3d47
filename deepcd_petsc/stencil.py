"""The 7-point stencil of an operator on a 3D DMDA: what the network reads.

Per cell (this rank's block, (D, H, W) = (nz, ny, nx) local, x fastest):
`diag` = A[i, i] and `coef[f]` = −A[i, nb_f(i)] for the six faces f in
FACES order (z−, z+, y−, y+, x−, x+; the order of mgnet's taps). A cell's
Dirichlet part is its diagonal excess diag − Σ_f coef[f]. Three sources:
- an assembled AIJ matrix (any AIJ type, any DMDA split): its local rows;
- matrix-free operators: 7 MatMults with the colouring (i + 2j + 3k) mod 7,
  under which the seven cells of any 7-point stencil differ in colour, then
  one MatMult with a random vector to check that A *is* 7-point;
- cell flags (scenes): the unit-coefficient operator, for comparison.
Why per row and not per face: a row only needs its own cells, so any split
reads its block without communication, and nonsymmetric rows (PETSc's
tutorials keep Dirichlet rows as identity) are represented as they are.
"""
import itertools

import numpy as np

from .errors import SetupError

# (axis in (z, y, x) array order, step); the same order as mgnet._FACES
FACES = ((0, -1), (0, 1), (1, -1), (1, 1), (2, -1), (2, 1))
FACE_NAMES = ("z-", "z+", "y-", "y+", "x-", "x+")
NCOLOURS = 7


def _colouring(flat):
    """(colours, (z, y, x) multipliers) of probing: (i + 2j + 3k) mod 7 on a
    3D grid; (i + 2j) mod 5 on a 2D one (nz = 1), where the 5 cells of a
    5-point stencil get c, c ± 1, c ± 2: two MatMults fewer."""
    return (5, (0, 2, 1)) if flat else (NCOLOURS, (3, 2, 1))


def _stencil_name(da):
    return ("5-point stencil on the 2D DMDA" if da.getSizes()[2] == 1
            else "7-point stencil on the DMDA")


class Stencil:
    """diag (D, H, W) and coef (6, D, H, W), float64, of one rank's block."""

    def __init__(self, diag, coef, periodic=(False, False, False)):
        self.diag = np.ascontiguousarray(diag, dtype=np.float64)
        self.coef = np.ascontiguousarray(coef, dtype=np.float64)
        self.periodic = tuple(bool(p) for p in periodic)     # (z, y, x)
        self._packed = None
        if self.coef.shape != (6,) + self.diag.shape:
            raise ValueError(f"coef {self.coef.shape} does not match diag {self.diag.shape}")

    @property
    def shape(self):
        return self.diag.shape

    def packed(self):
        """(7, D, H, W): the diagonal, then the six couplings (MGNet.prepare's
        `stencil`, the Lanczos caches); the array a from_packed stencil was
        made of, else a new one."""
        if self._packed is not None:
            return self._packed
        return np.concatenate([self.diag[None], self.coef], 0)

    @classmethod
    def from_packed(cls, arr, periodic=(False, False, False)):
        """diag and coef are views of a C-contiguous float64 arr (no copy of
        56 bytes a cell), which packed() then returns."""
        st = cls(arr[0], arr[1:], periodic)
        if isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.flags.c_contiguous:
            st._packed = arr
        return st

    def network_kw(self):
        """MGNet.prepare's operator arguments."""
        return {"stencil": self.packed(), "periodic": self.periodic}

    def active(self):
        """Rows the network works on: coupled to some neighbour."""
        return (self.coef != 0).any(0)

    def coupled_to(self, mask_padded):
        """Σ_f coef[f]·m(nb_f) for a one-cell-ghosted field m: helper for
        tests and the Dirichlet part."""
        out = np.zeros(self.shape)
        for f, (axis, step) in enumerate(FACES):
            out += self.coef[f] * _shift(mask_padded, axis, step)
        return out

    def apply(self, x_padded):
        """A x on the block for a one-cell-ghosted x (NumPy)."""
        inner = x_padded[1:-1, 1:-1, 1:-1]
        return self.diag * inner - self.coupled_to(x_padded)

    # -- comparisons ------------------------------------------------------
    def unit_scale(self, flags, dirichlet, flags_ghosted):
        """s when this block is exactly s × the operator the network's flags
        path builds from `flags` and the Dirichlet fraction (couplings 1 to
        FLUID neighbours only; diagonal = non-solid neighbours + open faces
        recovered from the fraction), so that compact path (fused kernels)
        is exact; None otherwise; NaN on a block without fluid (no
        opinion). `flags_ghosted`: the block's flags with one ghost layer."""
        from .scenes import AIR, FLUID, SOLID
        if any(self.periodic):
            return None          # the flags path has no wrap-around
        fluid = np.asarray(flags) == FLUID
        if not fluid.any():
            return float("nan")
        boths = [fluid & (_shift(flags_ghosted, axis, step) == FLUID) for axis, step in FACES]
        reject, lo, hi = self._fluid_couplings(boths)
        if reject:
            return None
        # all couplings of fluid rows equal (a unit operator): that value is
        # their median, known without sorting, and passes the checks below
        equal = (lo == hi and lo != 0 and abs(lo) < 1e300
                 and self._others_equal(fluid, boths, lo))
        s = float(lo)
        if not equal:
            c = self.coef[:, fluid]
            nz = c[c != 0]
            if nz.size == 0:
                return None
            s = float(np.median(nz))
        ns = np.zeros(fluid.shape, np.int8)
        ai = np.zeros(fluid.shape, np.int8)
        for f, (axis, step) in enumerate(FACES):
            nb = _shift(flags_ghosted, axis, step)
            # couplings to non-fluid cells are Dirichlet in both paths (x = 0
            # there): only those to fluid neighbours must be s
            both = boths[f]
            if not equal and both.any() and np.abs(self.coef[f][both] / s - 1).max() > 1e-8:
                return None
            ns += nb != SOLID
            ai += nb == AIR
        ns, ai = ns.astype(float), ai.astype(float)
        d = np.asarray(dirichlet, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            open_ = np.where(d < 1 - 1e-6, (d * ns - ai) / np.maximum(1 - d, 1e-6), 0.0)
        want = np.maximum(ns + np.maximum(np.round(open_), 0), 1)
        if np.abs(self.diag[fluid] / s - want[fluid]).max() > 1e-6 * want[fluid].max():
            return None
        return s

    def _fluid_couplings(self, boths):
        """(reject, lo, hi) for unit_scale: the range of the couplings
        between fluid cells (boths[f]: fluid rows with a fluid face-f
        neighbour), and whether they differ by more than any s could accept
        (unit_scale's answer is then None, known without its median). Only
        for finite couplings (a NaN median accepts anything): else
        (False, inf, −inf), as without fluid neighbours."""
        lo, hi = np.inf, -np.inf
        if not np.isfinite(self.coef.sum()):
            return False, lo, hi
        for f, both in enumerate(boths):
            if both.any():
                c = self.coef[f][both]
                lo, hi = min(lo, c.min()), max(hi, c.max())
                # all within 1e-8 of s puts any two within ~2e-8 of each other
                if hi - lo > 1e-6 * max(abs(lo), abs(hi)):
                    return True, lo, hi
        return False, lo, hi

    def _others_equal(self, fluid, boths, v):
        """Whether every nonzero coupling of a fluid row to a non-fluid cell is v."""
        for f, both in enumerate(boths):
            c = self.coef[f][fluid & ~both]
            c = c[c != 0]
            if c.size and (c.min() != v or c.max() != v):
                return False
        return True


def _shift(a, axis, step):
    sl = [slice(1, -1)] * 3
    sl[axis] = slice(1 + step, a.shape[axis] - 1 + step)
    return a[tuple(sl)]


def _neighbour_indices(da, local, rows=None):
    """PETSc global index of each face neighbour of every local cell
    (6, n), −1 beyond a non-periodic boundary; and the cells' own indices.
    `rows`: only those local cells (flat indices), (6, len(rows))."""
    from .layout import Layout
    layout = Layout.from_da(da)
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    nx, ny, nz = da.getSizes()
    sizes = (nz, ny, nx)
    periodic = periodic_axes(da)
    if rows is None:
        k, j, i = np.meshgrid(np.arange(zs, ze), np.arange(ys, ye), np.arange(xs, xe),
                              indexing="ij", copy=False)
    else:
        k, j, i = (a + o for a, o in zip(np.unravel_index(np.asarray(rows, np.int64), local),
                                         (zs, ys, xs)))
    own = layout.petsc_index(k, j, i).ravel()
    out = np.empty((6, own.size), np.int64)
    for f, (axis, step) in enumerate(FACES):
        idx = [k, j, i]
        v = idx[axis] + step
        n = sizes[axis]
        outside = (v < 0) | (v >= n)
        if periodic[axis]:
            v = v % n
            outside = np.zeros_like(outside)
        idx[axis] = np.clip(v, 0, n - 1)
        g = layout.petsc_index(*idx).ravel()
        g[outside.ravel()] = -1
        out[f] = g
    return out, own


def _inside_block(local):
    """(6, n) bool: whether each local cell's face-f neighbour lies in this
    rank's block (then its index is the cell's plus a fixed offset)."""
    zm, ym, xm = local
    out = np.ones((6,) + tuple(local), bool)
    for f, (axis, step) in enumerate(FACES):
        idx = [slice(None)] * 3
        idx[axis] = 0 if step < 0 else -1
        out[f][tuple(idx)] = False
    return out.reshape(6, -1)


def periodic_axes(da):
    """(z, y, x) flags of the DMDA's periodic axes."""
    from petsc4py import PETSc
    bt = da.getBoundaryType()
    per = tuple(b == PETSc.DM.BoundaryType.PERIODIC for b in bt)   # (x, y, z)
    return per[::-1]


def ghost_layer(da, arr, fill):
    """This rank's block of a cell field with one ghost layer (zm + 2, ym + 2,
    xm + 2), float64: the neighbours' values across the blocks' faces,
    wrapped on periodic axes, `fill` beyond the grid; on one process padded
    in NumPy instead of a DMDA ghost exchange."""
    arr = np.asarray(arr, dtype=np.float64)
    if da.getComm().getSize() == 1:
        per = periodic_axes(da)
        p = arr
        if any(per):
            p = np.pad(p, [(1, 1) if q else (0, 0) for q in per], mode="wrap")
        return np.pad(p, [(0, 0) if q else (1, 1) for q in per], constant_values=fill)
    g = da.createGlobalVec()
    with g as a:
        a[...] = arr.ravel()
    loc = da.createLocalVec()
    da.globalToLocal(g, loc)
    (gxs, gys, gzs), (gxm, gym, gzm) = da.getGhostCorners()
    (xs, ys, zs), (xm, ym, zm) = da.getCorners()
    p = np.pad(loc.getArray(readonly=True).reshape(gzm, gym, gxm), 1, constant_values=fill)
    g.destroy()
    loc.destroy()
    oz, oy, ox = zs - gzs, ys - gys, xs - gxs
    return p[oz:oz + zm + 2, oy:oy + ym + 2, ox:ox + xm + 2].copy()


def _not_7_point(da, row, col, val):
    return SetupError(f"the operator is not a {_stencil_name(da)}: row {row} "
                      f"couples to column {col} (value {val:.3g}); DCDM's network "
                      "reads 5-point (2D) and 7-point (3D) operators only")


class AIJRows:
    """An assembled AIJ operator's local rows, read in one C pass
    (kernels.c deepcd_csr_read) for both geometry_from_operator and
    from_aij: per row the nonzero count, Σ|v|, the diagonal and the six
    couplings to in-block neighbours, and the cells in-block fluid rows
    couple to; the few entries the in-block offset test leaves (block
    faces: other ranks, periodic wrap; anything beyond the 7 points) as
    (row, column, value), in entry order. Holds no reference to the CSR
    arrays. Use read_aij()."""

    def __init__(self, da, local, lo, res, aj, av):
        self.da, self.local, self.lo = da, tuple(int(v) for v in local), int(lo)
        self.st = res["st"]                  # (7, n): diag, then −coupling per face
        self.diag = self.st[0]
        self.rowabs = res["rowabs"]
        self.nnz = res["nnz"]
        self.coupled = res["coupled"]
        rows, pos = res["rest"]
        self.rest_rows = rows
        self.rest_cols = np.asarray(aj)[pos].astype(np.int64)
        self.rest_vals = np.asarray(av)[pos].real
        self._stencil = None

    def stencil(self):
        """from_aij's Stencil (SetupError, the same message, when a row
        couples beyond the 7 points): the left-over entries are matched
        to faces by the exact neighbour indices of their rows only."""
        if isinstance(self._stencil, SetupError):
            raise self._stencil
        if self._stencil is None:
            self._stencil = self._finish()
            if isinstance(self._stencil, SetupError):
                raise self._stencil
        return self._stencil

    def _finish(self):
        n = self.diag.size
        rr, cc, vv = self.rest_rows, self.rest_cols, self.rest_vals
        if rr.size:
            own, at = np.unique(rr, return_inverse=True)
            nb, _ = _neighbour_indices(self.da, self.local, own)
            face = np.full(rr.shape, -1, np.int8)
            for f in range(5, -1, -1):
                # periodic grids of 2 cells: both neighbours are one cell;
                # that coupling goes to the first face (assigned last)
                face[cc == nb[f][at]] = f
            matched = face >= 0
            # each (row, face) holds one entry: −(0 + v) as from_aij's bincount
            np.subtract.at(self.st.reshape(-1), (1 + face[matched].astype(np.int64)) * n
                           + rr[matched], vv[matched])
            if not matched.all():
                bad = np.flatnonzero(~matched)[0]
                return _not_7_point(self.da, self.lo + rr[bad], cc[bad], vv[bad])
        return Stencil.from_packed(self.st.reshape((7,) + self.local), periodic_axes(self.da))


def read_aij(da, A, local):
    """AIJRows of an assembled AIJ operator's local rows (A.getValuesCSR()
    read once, in C), or None: not an AIJ matrix, or the C kernels are
    unavailable (DEEPCD_KERNELS=0, no compiler) or do not read its types
    (complex scalars): then from_aij and geometry_from_operator read the
    rows in NumPy."""
    from . import kernels
    if not A.getType().endswith("aij") or kernels.load() is None:
        return None
    ai, aj, av = A.getValuesCSR()
    lo, _ = A.getOwnershipRange()
    res = kernels.csr_rows(local, lo, ai, aj, av)
    if res is None:
        return None
    return AIJRows(da, local, lo, res, aj, av)


def from_aij(da, A, local, kernels=True):
    """The stencil of an assembled AIJ operator's local rows. SetupError,
    naming a row and a column, when a row couples beyond the 7 points.
    One C pass over the rows (read_aij) where the kernels are available
    and `kernels`; else NumPy, with the same result bit for bit."""
    rows = read_aij(da, A, local) if kernels else None
    if rows is not None:
        return rows.stencil()
    return _from_aij_numpy(da, A, local)


def _from_aij_numpy(da, A, local):
    n = int(np.prod(local))
    ai, aj, av = A.getValuesCSR()
    av = np.asarray(av).real
    keep = av != 0
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(ai))[keep].astype(np.int64)
    cols = np.asarray(aj)[keep].astype(np.int64)
    vals = av[keep]
    lo, _ = A.getOwnershipRange()
    # inside this rank's block a neighbour's PETSc index is the row's plus a
    # fixed offset (±1, ±xm, ±xm·ym): classify every entry by that in one
    # pass, and compare with the exact neighbour indices only where the
    # offset test cannot decide (block faces: other ranks, periodic wrap)
    zm, ym, xm = local
    delta = cols - rows
    delta -= lo
    face = np.full(delta.shape, -1, np.int8)        # −1 unknown, 6 diagonal
    face[delta == 0] = 6
    for f, off in enumerate((-xm * ym, xm * ym, -xm, xm, -1, 1)):
        face[delta == off] = f
    del delta
    cand = face < 6
    sel = np.flatnonzero(cand & (face >= 0))
    ok = _inside_block(local)[face[sel], rows[sel]]
    face[sel[~ok]] = -1
    rest = np.flatnonzero(face < 0)
    if rest.size:
        nb, _ = _neighbour_indices(da, local)
        rr, cc = rows[rest], cols[rest]
        for f in range(5, -1, -1):
            # periodic grids of 2 cells: both neighbours are one cell; that
            # coupling goes to the first face (assigned last)
            face[rest[cc == nb[f][rr]]] = f
    matched = face >= 0
    sums = np.bincount(rows[matched] * 7 + face[matched], weights=vals[matched],
                       minlength=7 * n).reshape(n, 7)
    diag = sums[:, 6].copy()
    coef = -sums[:, :6].T
    if not matched.all():
        bad = np.flatnonzero(~matched)[0]
        raise _not_7_point(da, lo + rows[bad], cols[bad], vals[bad])
    return Stencil(diag.reshape(local), coef.reshape((6,) + tuple(local)), periodic_axes(da))


def probe(da, A, local, check=True):
    """The stencil of a matrix-free operator (any Mat with mult) from 7
    MatMults with colour vectors (5 on a 2D grid), plus one random check.
    Exact for any 7-point operator, since neighbours never share a colour.
    A periodic axis whose length is not a multiple of the colour count
    breaks that at the wrap: the colouring is then repeated with that axis'
    seam moved to its middle (st.matmults counts the MatMults)."""
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    idx = np.meshgrid(np.arange(zs, ze), np.arange(ys, ye), np.arange(xs, xe), indexing="ij")
    nx, ny, nz = da.getSizes()
    sizes = (nz, ny, nx)
    nc, mults = _colouring(nz == 1)
    per = periodic_axes(da)
    seams = [a for a in range(3) if per[a] and (sizes[a] * mults[a]) % nc != 0]
    for a in seams:
        if sizes[a] < 4:
            raise SetupError(f"probing a matrix-free operator on a periodic DMDA needs the periodic "
                             f"axis {'zyx'[a]} to have at least 4 cells (it has {sizes[a]}); "
                             "assemble the operator (AIJ) or use deepcd_petsc.set_stencil instead")
    x = da.createGlobalVec()
    y = da.createGlobalVec()
    diag = np.zeros(local)
    coef = np.zeros((6,) + tuple(local))
    done = np.zeros(local, bool)
    count = 0
    try:
        # every cell is off the seam (layers 0 and n−1) of each axis in one
        # of the shift combinations: 0, or half the axis where it sits on it
        for shifts in itertools.product(*[(0, sizes[a] // 2) if a in seams else (0,)
                                          for a in range(3)]):
            pos = [(ix + sh) % n for ix, sh, n in zip(idx, shifts, sizes)]
            ok = ~done
            for a in seams:
                ok &= (pos[a] != 0) & (pos[a] != sizes[a] - 1)
            if not da.getComm().tompi4py().allreduce(bool(ok.any())):
                continue
            colour = sum(m * q for m, q in zip(mults, pos)) % nc
            for c in range(nc):
                x.getArray()[...] = (colour == c).ravel().astype(float)
                x.stateIncrease()
                A.mult(x, y)
                count += 1
                ya = y.getArray(readonly=True).reshape(local)
                # the cells of a stencil differ in colour, so y(p) is diag(p)
                # where p has colour c, −coef_f(p) where nb_f(p) has it, else 0
                own = ok & (colour == c)
                diag[own] = ya[own]
                for f, (axis, step) in enumerate(FACES):
                    if mults[axis] == 0:
                        continue          # 2D: no z neighbours (zeroed below)
                    sel = ok & ((colour + step * mults[axis]) % nc == c)
                    coef[f][sel] = -ya[sel]
            done |= ok
        st = Stencil(diag, coef, per)
        _zero_outside(st, da)
        if check:
            _check_probe(da, A, st, x, y, local)
            count += 1
    finally:
        x.destroy()
        y.destroy()
    st.matmults = count
    return st


def _zero_outside(st, da):
    """Faces beyond a non-periodic boundary have no neighbour: the colour
    read there is another cell's response, not a coupling."""
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    nx, ny, nz = da.getSizes()
    starts, ends, sizes = (zs, ys, xs), (ze, ye, xe), (nz, ny, nx)
    for f, (axis, step) in enumerate(FACES):
        if st.periodic[axis]:
            continue
        idx = [slice(None)] * 3
        if step < 0 and starts[axis] == 0:
            idx[axis] = 0
            st.coef[f][tuple(idx)] = 0.0
        if step > 0 and ends[axis] == sizes[axis]:
            idx[axis] = -1
            st.coef[f][tuple(idx)] = 0.0


def _check_probe(da, A, st, x, y, local):
    """A x = stencil x for a random x, else the operator is not 7-point."""
    rng = np.random.default_rng(12345 + da.getComm().getRank())
    xa = rng.standard_normal(local)
    x.getArray()[...] = xa.ravel()
    x.stateIncrease()
    A.mult(x, y)
    ref = y.getArray(readonly=True).reshape(local)
    gx = da.createLocalVec()
    da.globalToLocal(x, gx)
    (gxs, gys, gzs), (gxm, gym, gzm) = da.getGhostCorners()
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    g = gx.getArray(readonly=True).reshape(gzm, gym, gxm)
    g = np.pad(g, 1)
    sl = tuple(slice(o, o + n + 2) for o, n in
               zip((zs - gzs, ys - gys, xs - gxs), local))
    mine = st.apply(g[sl])
    gx.destroy()
    from mpi4py import MPI
    comm = da.getComm().tompi4py()
    err = comm.allreduce(float(np.abs(mine - ref).max(initial=0.0)), op=MPI.MAX)
    scale = comm.allreduce(float(np.abs(ref).max(initial=0.0)), op=MPI.MAX)
    if err > 1e-8 * max(scale, 1e-300):
        raise SetupError(f"the matrix-free operator is not a {_stencil_name(da)} "
                         f"(probing misses {err / max(scale, 1e-300):.2e} of A x for a random x); "
                         "DCDM's network reads 5-point (2D) and 7-point (3D) operators only")


def from_flags(flags_local, pflags_local):
    """The unit-coefficient operator of a scene's block: fluid rows couple
    1 to fluid neighbours and count every non-solid neighbour in the
    diagonal. `pflags_local`: the block with one ghost layer."""
    from .scenes import FLUID, SOLID
    fluid = np.asarray(flags_local) == FLUID
    st = np.empty((7,) + fluid.shape)      # packed: diag, then the couplings
    nonsolid = np.zeros(fluid.shape, np.int8)
    for f, (axis, step) in enumerate(FACES):
        nb = _shift(pflags_local, axis, step)
        nonsolid += nb != SOLID
        np.logical_and(fluid, nb == FLUID, out=st[1 + f], casting="unsafe")
    st[0] = np.where(fluid, nonsolid, 1)
    return Stencil.from_packed(st)


def from_coefficients(flags, open_faces, coefficients):
    """The whole-grid stencil of an operator family's scene, as
    problem.assemble_csr assembles it (training builds operators without
    PETSc): fluid rows couple T_f to fluid neighbours and count every
    non-solid neighbour's T_f in the diagonal; other rows are identity."""
    from .scenes import FLUID, SOLID, padded
    per = coefficients.periodic
    p = padded(np.asarray(flags), set(open_faces), per)
    fluid = np.asarray(flags) == FLUID
    trans = coefficients.face_transmissibilities(p)
    diag = np.zeros(fluid.shape)
    coef = np.zeros((6,) + fluid.shape)
    for f, (axis, step) in enumerate(FACES):
        nb = _shift(p, axis, step)
        diag += np.where(fluid & (nb != SOLID), trans[f], 0.0)
        coef[f] = np.where(fluid & (nb == FLUID), trans[f], 0.0)
    return Stencil(np.where(fluid, diag, 1.0), coef, per)
