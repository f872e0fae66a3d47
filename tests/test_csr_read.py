"""Reading an assembled operator's rows in one C pass (kernels.c
deepcd_csr_read, stencil.read_aij): the stencil (stencil.from_aij) and the
geometry (context.geometry_from_operator) equal the NumPy reading's bit for
bit: every scene of test_stencil.py, PETSc's ex45 (Dirichlet rows kept, on
STAR and BOX DMDAs), blocks one cell thick and periodic axes of 1 or 2
cells (offsets that coincide), operators beyond the 7 points (the same
SetupError), int32 and int64 indices, any thread count; and the NumPy
path still runs without the kernels. Under mpiexec: tests/mpi/stencil_split.py
(test_stencil.py::test_split_stencil_equals_serial)."""
import hashlib

import numpy as np
import pytest
import scipy.sparse as sp
from petsc4py import PETSc

from helpers import ex45_system
from test_stencil import (EXTRA, SCENES, SHAPE, _extra, _plane_9_point, aij_of, local_shape,
                          problem, stencil_matrix, to_scipy)

from deepcd_petsc import kernels, stencil
from deepcd_petsc.context import geometry_from_operator
from deepcd_petsc.errors import SetupError
from deepcd_petsc.scenes import AIR, FLUID, SOLID

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="C kernels unavailable")


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def outcome(fn):
    try:
        return fn()
    except SetupError as e:
        return f"SetupError: {e}"


def assert_c_equals_numpy(da, A):
    """from_aij and geometry_from_operator, C pass and NumPy, bit for bit
    (a SetupError: the same message). Returns the C pass's AIJRows."""
    local = local_shape(da)
    rows = stencil.read_aij(da, A, local)
    assert rows is not None, "the C pass did not run"
    c = outcome(lambda: stencil.from_aij(da, A, local))
    n = outcome(lambda: stencil.from_aij(da, A, local, kernels=False))
    if isinstance(n, str):
        assert c == n
    else:
        assert same_bits(c.diag, n.diag) and same_bits(c.coef, n.coef)
        assert c.periodic == n.periodic
    gc = geometry_from_operator(da, A, local, with_rows=True)
    gn = geometry_from_operator(da, A, local, with_rows=True, kernels=False)
    for a, b in zip(gc[:3], gn[:3]):
        assert same_bits(a, b)
    assert gc[3] == gn[3] and type(gc[3][0]) is type(gn[3][0]) and type(gc[3][1]) is type(gn[3][1])
    # given the rows read already (as NetworkContext._geometry does)
    gr = geometry_from_operator(da, A, local, with_rows=True, aij=rows)
    assert all(same_bits(a, b) for a, b in zip(gr[:3], gc[:3])) and gr[3] == gc[3]
    return rows


def coupled_reference(A, fluid):
    """Cells some fluid row couples to off its diagonal (SciPy, one rank)."""
    S = to_scipy(A)
    S.eliminate_zeros()
    S = sp.csr_matrix(sp.diags(fluid.ravel().astype(float)) @ S)
    S = sp.csr_matrix(S - sp.diags(S.diagonal()))
    S.eliminate_zeros()
    return np.asarray((S != 0).sum(0)).ravel() > 0


def assert_coupled_marks(rows, A):
    """The C pass's in-block marks plus its left-over entries' columns are
    the cells fluid rows couple to."""
    fluid = rows.nnz - (rows.diag != 0) > 0
    got = rows.coupled.copy()
    got[rows.rest_cols[fluid[rows.rest_rows]]] = True
    assert np.array_equal(got, coupled_reference(A, fluid))


def kept_dirichlet(shape, stencil_type, spacing=(1.0, 1.0, 1.0)):
    """ex45's system (Dirichlet rows kept as diagonal rows, interior rows
    coupled to them) on a (nx, ny, nz) grid of cells hx × hy × hz, on a
    STAR or BOX DMDA (BOX: explicit zeros for the 27-point pattern)."""
    nx, ny, nz = shape
    hx, hy, hz = spacing
    cx, cy, cz = hy * hz / hx, hx * hz / hy, hx * hy / hz
    da = PETSc.DMDA().create([nx, ny, nz], dof=1, stencil_width=1, stencil_type=stencil_type,
                             comm=PETSc.COMM_SELF)
    A = da.createMat()
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                row.index = (i, j, k)
                d = 2 * (cx + cy + cz)
                A.setValueStencil(row, row, d)
                if 0 in (i, j, k) or i == nx - 1 or j == ny - 1 or k == nz - 1:
                    continue
                for (di, dj, dk), c in (((1, 0, 0), cx), ((-1, 0, 0), cx), ((0, 1, 0), cy),
                                        ((0, -1, 0), cy), ((0, 0, 1), cz), ((0, 0, -1), cz)):
                    col.index = (i + di, j + dj, k + dk)
                    A.setValueStencil(row, col, -c)
    A.assemble()
    return da, A


# ------------------------------------------------------------------ scenes
@pytest.mark.parametrize("scene", SCENES + ("box",))
def test_c_read_equals_numpy(scene):
    p = problem(scene)
    rows = assert_c_equals_numpy(p.da, p.A)
    assert_coupled_marks(rows, p.A)
    # periodic wraps are left over (exact neighbour indices), others not
    assert (rows.rest_rows.size > 0) == (scene == "periodic")


@pytest.mark.parametrize("stencil_type", ["star", "box"])
@pytest.mark.parametrize("shape,spacing", [((9, 9, 9), (1 / 8, 1 / 8, 1 / 8)),
                                           ((7, 9, 11), (1 / 6, 1 / 8, 1 / 40))])
def test_c_read_equals_numpy_kept_dirichlet_rows(stencil_type, shape, spacing):
    st = {"star": PETSc.DMDA.StencilType.STAR, "box": PETSc.DMDA.StencilType.BOX}[stencil_type]
    da, A = kept_dirichlet(shape, st, spacing)
    av = A.getValuesCSR()[2]
    # DMDA matrices store their stencil's whole pattern, zeros included
    assert (av == 0).sum() > (20 if stencil_type == "box" else 0) * np.prod(shape) / 2
    rows = assert_c_equals_numpy(da, A)
    assert_coupled_marks(rows, A)
    local = local_shape(da)
    flags, dirichlet, decoupled, scale = geometry_from_operator(da, A, local, with_rows=True)
    # the boundary rows are kept: air, solved by their diagonal
    inner = (slice(1, -1),) * 3
    assert (flags[inner] == FLUID).all()
    assert decoupled.sum() == flags.size - flags[inner].size
    assert ((flags == AIR) | (flags == FLUID)).sum() == flags.size - 8 - 4 * sum(
        n - 2 for n in shape)      # corners and edges: no fluid row couples to them
    A.destroy()
    da.destroy()


def test_c_read_equals_numpy_ex45():
    da, A, b = ex45_system(9)
    assert_c_equals_numpy(da, A)
    for o in (A, b, da):
        o.destroy()


# one cell thick blocks (offsets ±1, ±xm, ±xm·ym coincide) and periodic
# axes of 1 or 2 cells (both neighbours one cell): (nx, ny, nz), periodic (z, y, x)
ODD = [((1, 3, 4), (False,) * 3), ((3, 1, 4), (False,) * 3), ((3, 4, 1), (False,) * 3),
       ((1, 1, 5), (False,) * 3), ((2, 3, 4), (False, False, True)),
       ((3, 2, 4), (False, True, False)), ((3, 4, 2), (True, False, False)),
       ((2, 2, 2), (True, True, True)), ((1, 3, 4), (False, False, True)),
       ((1, 2, 3), (False, True, False)), ((2, 1, 3), (True, False, True))]


@pytest.mark.parametrize("sizes,periodic", ODD)
def test_c_read_equals_numpy_odd_blocks(sizes, periodic):
    nx, ny, nz = sizes
    shape = (nz, ny, nx)
    bt = tuple(PETSc.DM.BoundaryType.PERIODIC if p else PETSc.DM.BoundaryType.NONE
               for p in periodic[::-1])
    da = PETSc.DMDA().create([nx, ny, nz], dof=1, stencil_width=1, boundary_type=bt,
                             stencil_type=PETSc.DMDA.StencilType.STAR, comm=PETSc.COMM_SELF)
    rng = np.random.default_rng(sum(sizes))
    coef = rng.uniform(0.5, 1.5, (6,) + shape)
    coef[rng.random(coef.shape) < 0.2] = 0.0           # some rows solid
    for f, (axis, step) in enumerate(stencil.FACES):
        if not periodic[axis]:
            idx = [slice(None)] * 3
            idx[axis] = 0 if step < 0 else -1
            coef[f][tuple(idx)] = 0.0
    diag = coef.sum(0) + rng.uniform(0, 0.5, shape)
    A = aij_of(stencil_matrix(diag, coef, periodic))
    rows = assert_c_equals_numpy(da, A)
    assert_coupled_marks(rows, A)
    A.destroy()
    da.destroy()


# ------------------------------------------------------------------ beyond 7 points
@pytest.mark.parametrize("scene,row,col", EXTRA)
def test_c_read_rejects_non_7_point_like_numpy(scene, row, col):
    p = problem(scene)
    S, r, c = _extra(p, row, col)
    B = aij_of(S)
    assert_c_equals_numpy(p.da, B)
    with pytest.raises(SetupError, match=rf"row {r} couples to column {c}\b"):
        stencil.read_aij(p.da, B, local_shape(p.da)).stencil()
    B.destroy()


def test_c_read_many_left_over_entries():
    """A 9-point plane stencil: four left-over entries per interior row,
    more than the first pass has room for (it is run again with more)."""
    p = problem("density")
    B = aij_of(_plane_9_point(p))
    rows = assert_c_equals_numpy(p.da, B)
    assert rows.rest_rows.size > 2 * sum(a * b for a, b in ((14, 12), (12, 10), (10, 14)))
    assert_coupled_marks(rows, B)
    B.destroy()


# ------------------------------------------------------------------ the kernel itself
def test_csr_rows_index_types_and_threads():
    p = problem("periodic")
    local = local_shape(p.da)
    ai, aj, av = p.A.getValuesCSR()
    lo, _ = p.A.getOwnershipRange()
    ref = None
    for itype in (np.int32, np.int64):
        for threads in (1, 2, 3, 7):
            got = kernels.csr_rows(local, lo, ai.astype(itype), aj.astype(itype), av, threads)
            if ref is None:
                ref = got
                assert got["rest"].shape[1] > 0
                continue
            for key in ref:
                assert same_bits(got[key], ref[key]), (itype, threads, key)
    # types it does not read: None (the caller reads in NumPy)
    assert kernels.csr_rows(local, lo, ai.astype(np.int16), aj.astype(np.int16), av) is None
    assert kernels.csr_rows(local, lo, ai, aj, av.astype(np.float32)) is None
    assert kernels.csr_rows(local, lo, ai, aj.astype(np.int64 if aj.dtype == np.int32
                                                   else np.int32), av) is None


def test_numpy_path_without_kernels(monkeypatch):
    p = problem("stretch")
    local = local_shape(p.da)
    st = stencil.from_aij(p.da, p.A, local)
    geo = geometry_from_operator(p.da, p.A, local, with_rows=True)
    monkeypatch.setattr(kernels, "load", lambda: None)
    assert kernels.csr_rows(local, 0, *p.A.getValuesCSR()) is None
    assert stencil.read_aij(p.da, p.A, local) is None
    st2 = stencil.from_aij(p.da, p.A, local)
    geo2 = geometry_from_operator(p.da, p.A, local, with_rows=True)
    assert same_bits(st.diag, st2.diag) and same_bits(st.coef, st2.coef)
    assert all(same_bits(a, b) for a, b in zip(geo[:3], geo2[:3])) and geo[3] == geo2[3]


# ------------------------------------------------------------------ unit_scale
def unit_scale_reference(st, flags, dirichlet, flags_ghosted):
    """Stencil.unit_scale as it was before its shortcuts (median always)."""
    from deepcd_petsc.stencil import FACES, _shift
    if any(st.periodic):
        return None
    fluid = np.asarray(flags) == FLUID
    if not fluid.any():
        return float("nan")
    c = st.coef[:, fluid]
    nz = c[c != 0]
    if nz.size == 0:
        return None
    s = float(np.median(nz))
    ns = np.zeros(fluid.shape)
    ai = np.zeros(fluid.shape)
    for f, (axis, step) in enumerate(FACES):
        nb = _shift(flags_ghosted, axis, step)
        both = fluid & (nb == FLUID)
        if both.any() and np.abs(st.coef[f][both] / s - 1).max() > 1e-8:
            return None
        ns += nb != SOLID
        ai += nb == AIR
    d = np.asarray(dirichlet, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        open_ = np.where(d < 1 - 1e-6, (d * ns - ai) / np.maximum(1 - d, 1e-6), 0.0)
    want = np.maximum(ns + np.maximum(np.round(open_), 0), 1)
    if np.abs(st.diag[fluid] / s - want[fluid]).max() > 1e-6 * want[fluid].max():
        return None
    return s


def _variants(st, fluid, ghosted):
    """The stencil, scaled, and changed in ways that move the median or
    break (or barely keep) the unit operator."""
    from deepcd_petsc.stencil import FACES, _shift
    yield st
    yield stencil.Stencil(2.5 * st.diag, 2.5 * st.coef)
    f0 = tuple(np.argwhere(fluid & (st.coef[5] != 0))[0])
    for change in (1 + 1e-9, 1 + 1e-5, np.nan):      # inside, outside the tolerance; NaN
        c = st.coef.copy()
        c[5][f0] = c[5][f0] * change
        yield stencil.Stencil(st.diag, c)
    # a coupling of a fluid row to a non-fluid neighbour (kept Dirichlet
    # rows: nonzero; else zero), changed, or made NaN
    for f, (axis, step) in enumerate(FACES):
        other = fluid & (_shift(ghosted, axis, step) != FLUID)
        if other.any():
            at = tuple(np.argwhere(other)[0])
            for value in (0.7 * (st.coef[f][at] or 1.0), np.nan, 2 * st.coef.max()):
                c = st.coef.copy()
                c[f][at] = value
                yield stencil.Stencil(st.diag, c)
            break


def _unit_scale_case(case):
    if case == "ex45":
        da, A, b = ex45_system(9)
        b.destroy()
        return da, A
    scene, n, seed = case
    p = problem(scene, (n, n, n), seed=seed)
    return p.da, p.A


@pytest.mark.parametrize("case", [("box", 12, 1), ("spheres", 16, 3), ("spheres", 16, 2),
                                  ("density", 12, 1), ("aniso", 12, 1), "ex45"],
                         ids=["box", "spheres3", "spheres2", "density", "aniso", "ex45"])
def test_unit_scale_equals_reference(case):
    from deepcd_petsc.context import _ghosted
    da, A = _unit_scale_case(case)
    local = local_shape(da)
    flags, dirichlet = geometry_from_operator(da, A, local)
    st = stencil.from_aij(da, A, local)
    g = _ghosted(da, flags)
    results = []
    for v in _variants(st, flags == FLUID, g):
        got, want = v.unit_scale(flags, dirichlet, g), unit_scale_reference(v, flags, dirichlet, g)
        assert (got is None and want is None) or (got is not None and want is not None and (
            got == want or (got != got and want != want))), (len(results), got, want)
        results.append(got)
    assert len(results) >= 5
    if case[0] in ("box", "ex45") or case == ("spheres", 16, 3):
        assert results[0] is not None and results[0] > 0 and results[1] == 2.5 * results[0]


def test_geometry_digest_unchanged():
    """NetworkContext's stencil digest: sha256 of the stencil over its
    largest |coupling|, rounded to float32 (the network's precision)."""
    from test_ksp import DCDM, make_ksp
    p = problem("density")
    with make_ksp(p.A, "csrd_", DCDM, p.da) as ksp:
        ksp.setUp()
        ctx = ksp.getPythonContext()
        digest = str(ctx.derived[3])
    s = stencil.from_aij(p.da, p.A, local_shape(p.da)).packed()
    nz = np.abs(s[1:][s[1:] != 0])
    assert digest == hashlib.sha256((s / float(nz.max())).astype(np.float32).tobytes()).hexdigest()


@pytest.mark.parametrize("scene", ["density", "spheres"])
def test_context_geometry_same_without_the_c_pass(scene, monkeypatch):
    """NetworkContext's set-up (the rows read once in C, shared by the
    geometry and the stencil) derives what the NumPy readings derive."""
    from test_ksp import DCDM, make_ksp
    p = problem(scene, (16, 16, 16), seed=3)
    derived = []
    for c_pass in (True, False):
        if not c_pass:
            monkeypatch.setattr(stencil, "read_aij", lambda *a: None)
        with make_ksp(p.A, f"csrc{int(c_pass)}_", DCDM, p.da) as ksp:
            ksp.setUp()
            ctx = ksp.getPythonContext()
            derived.append((ctx.derived, ctx.operator_path, ctx.geometry_source))
    (d1, path1, src1), (d2, path2, src2) = derived
    assert path1 == path2 and src1 == src2
    assert all(same_bits(a, b) for a, b in zip(d1, d2))


@pytest.mark.parametrize("chunk", [5, 64, 1 << 18])
def test_scaled_digest_equals_hashing_the_quotient(chunk):
    from deepcd_petsc.context import _scaled_digest
    rng = np.random.default_rng(chunk)
    for shape in [(7, 3, 4, 5), (7, 9, 8, 7)]:
        a = rng.standard_normal(shape)
        a[1:][a[1:] > 0.5] = 0.0
        nz = np.abs(a[1:][a[1:] != 0])
        ref = float(nz.max())
        assert _scaled_digest(a, chunk) == hashlib.sha256((a / ref).astype(np.float32).tobytes()).hexdigest()
        # a change the float32 network cannot see keeps the digest; one it can see does not
        b = a.copy()
        b[3, 1, 1, 1] *= 1 + 1e-12
        assert _scaled_digest(b, chunk) == _scaled_digest(a, chunk)
        b[3, 1, 1, 1] = a[3, 1, 1, 1] * (1 + 1e-5) + 1e-5
        assert _scaled_digest(b, chunk) != _scaled_digest(a, chunk)
        a[1:] = 0.0
        assert _scaled_digest(a, chunk) == hashlib.sha256(a.astype(np.float32).tobytes()).hexdigest()
