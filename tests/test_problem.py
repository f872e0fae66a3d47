"""Serial assembly checked against an independent, loop-based scipy reference."""
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from petsc4py import PETSc

from deepcd_petsc.errors import UserError
from deepcd_petsc.layout import Layout
from deepcd_petsc.petsc_compat import null_space
from deepcd_petsc.problem import Problem
from deepcd_petsc.scenes import make_flags
from helpers import reference_matrix

FLUID, SOLID, AIR = 0, 1, 2
SHAPES_XYZ = [(6, 5, 7), (5, 5, 5)]
GEN_SCENES = ["box", "smoke", "spheres", "liquid"]
OPEN_SCENES = ["smoke", "spheres", "liquid"]


def petsc_csr(A):
    indptr, indices, data = A.getValuesCSR()
    N = A.getSize()[0]
    return sp.csr_matrix((data, indices, indptr), shape=(N, N))


def assert_same(M, R):
    D = (M - R).tocsr()
    D.eliminate_zeros()
    assert D.nnz == 0, f"{D.nnz} entries differ"
    # no explicitly stored zeros beyond the stencil either
    M2 = M.copy(); M2.eliminate_zeros()
    assert M2.nnz == R.nnz


@pytest.fixture
def problems():
    made = []

    def make(*a, **kw):
        p = Problem(*a, comm=PETSc.COMM_SELF, **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.destroy()


def random_flags_file(tmp_path, shape_zyx, seed):
    rng = np.random.default_rng(seed)
    flags = rng.choice(np.array([0, 1, 2], np.int8), size=shape_zyx, p=[0.6, 0.25, 0.15])
    path = tmp_path / "flags.npy"
    np.save(path, flags)
    return path, flags


@pytest.mark.parametrize("shape", SHAPES_XYZ)
@pytest.mark.parametrize("scene", GEN_SCENES)
@pytest.mark.parametrize("seed", [0, 7])
def test_matrix_matches_reference(problems, scene, shape, seed):
    nx, ny, nz = shape
    flags, faces = make_flags(scene, (nz, ny, nx), seed)
    assert flags.dtype == np.int8 and flags.shape == (nz, ny, nx)
    p = problems(flags, faces, seed=seed)
    assert p.A.getSize() == (nx * ny * nz,) * 2
    M, R = petsc_csr(p.A), reference_matrix(flags, faces)
    assert_same(M, R)
    assert abs(M - M.T).max() == 0


@pytest.mark.parametrize("shape", SHAPES_XYZ)
@pytest.mark.parametrize("open_faces", [None, {"x-", "y+"}])
def test_file_scene_matches_reference(problems, tmp_path, shape, open_faces):
    nx, ny, nz = shape
    path, raw = random_flags_file(tmp_path, (nz, ny, nx), 3)
    flags, faces = make_flags("file", (nz, ny, nx), 0, flags_file=str(path),
                              open_faces=open_faces)
    assert faces == (set(open_faces) if open_faces else set())
    # only isolated fluid cells may have changed (to solid)
    changed = flags != raw
    assert np.all(raw[changed] == FLUID) and np.all(flags[changed] == SOLID)
    p = problems(flags, faces, seed=1)
    assert_same(petsc_csr(p.A), reference_matrix(flags, faces))


def test_isolated_fluid_cells_become_solid(tmp_path):
    flags = np.ones((5, 5, 5), np.int8)
    flags[1:4, 1:4, 1:4] = FLUID
    flags[2, 2, 2] = SOLID
    flags[1, 1, 1] = FLUID
    flags[1, 1, 2] = SOLID
    flags[1, 2, 1] = SOLID
    flags[2, 1, 1] = SOLID  # (1,1,1) now walled in on all six sides
    np.save(tmp_path / "f.npy", flags)
    out, _ = make_flags("file", (5, 5, 5), flags_file=str(tmp_path / "f.npy"))
    assert out[1, 1, 1] == SOLID
    assert (out != flags).sum() == 1


def test_closed_box_nullspace(problems):
    nx, ny, nz = 6, 5, 7
    flags, faces = make_flags("box", (nz, ny, nx), 0)
    assert faces == set()
    p = problems(flags, faces, seed=0)
    assert p.nullspace is not None
    assert p.closed_regions == 1
    M = petsc_csr(p.A)
    ones = (flags == FLUID).ravel().astype(float)
    assert np.abs(M @ ones).max() == 0
    if hasattr(p.nullspace, "test"):
        assert p.nullspace.test(p.A)
    vecs = p.nullspace.getVecs()
    assert len(vecs) == 1
    v = vecs[0].getArray(readonly=True)    # PETSc 3.26 locks null space vectors
    assert np.isclose(np.linalg.norm(v), 1.0)
    assert np.allclose(v, ones / np.sqrt(ones.sum()))
    # A carries the null space
    assert null_space(p.A) is not None
    # b is consistent: orthogonal to the null space
    b = p.b.getArray()
    assert abs(b[ones > 0].sum()) <= 1e-12 * np.linalg.norm(b) * np.sqrt(b.size)
    assert np.linalg.norm(b) > 0


@pytest.mark.parametrize("scene", OPEN_SCENES)
def test_open_scenes_are_spd(problems, scene):
    nx, ny, nz = 6, 5, 7
    flags, faces = make_flags(scene, (nz, ny, nx), 7)
    assert faces == {"z+"}
    p = problems(flags, faces, seed=7)
    assert p.nullspace is None
    assert null_space(p.A) is None
    assert p.closed_regions == 0
    R = reference_matrix(flags, faces).toarray()
    assert scipy.linalg.eigvalsh(R).min() > 1e-10


@pytest.mark.parametrize("scene", GEN_SCENES)
def test_rhs_zero_off_fluid(problems, scene):
    nx, ny, nz = 6, 5, 7
    flags, faces = make_flags(scene, (nz, ny, nx), 7)
    p = problems(flags, faces, seed=7)
    b = p.b.getArray()
    assert np.all(b[flags.ravel() != FLUID] == 0.0)
    assert np.all(np.isfinite(b)) and np.linalg.norm(b) > 0
    # to_natural agrees with the serial ordering
    nat = p.to_natural(p.b)
    assert nat.shape == (nz, ny, nx)
    assert np.array_equal(nat.ravel(), b)


def test_rhs_depends_on_seed(problems):
    flags, faces = make_flags("box", (5, 5, 5), 0)
    b1 = problems(flags, faces, seed=1).b.getArray().copy()
    b2 = problems(flags, faces, seed=2).b.getArray().copy()
    b1b = problems(flags, faces, seed=1).b.getArray().copy()
    assert np.array_equal(b1, b1b)
    assert not np.allclose(b1, b2)


def test_two_closed_regions(problems, tmp_path):
    nx, ny, nz = 7, 5, 6
    flags = np.zeros((nz, ny, nx), np.int8)
    flags[:, :, 3] = SOLID  # wall plane x = 3
    path = tmp_path / "two.npy"
    np.save(path, flags)
    f, faces = make_flags("file", (nz, ny, nx), 0, flags_file=str(path))
    assert faces == set()
    p = problems(f, faces, seed=0)
    assert p.nullspace is not None
    assert p.closed_regions == 2
    vecs = [v.getArray(readonly=True).copy() for v in p.nullspace.getVecs()]
    assert len(vecs) == 2
    M = petsc_csr(p.A)
    for v in vecs:
        assert np.abs(M @ v).max() < 1e-14
    assert abs(vecs[0] @ vecs[1]) == 0
    if hasattr(p.nullspace, "test"):
        assert p.nullspace.test(p.A)
    b = p.b.getArray()
    for v in vecs:
        assert abs(v @ b) <= 1e-12 * np.linalg.norm(b)
    # the reference has exactly a 2-dimensional kernel
    ev = scipy.linalg.eigvalsh(reference_matrix(f, faces).toarray())
    assert (np.abs(ev) < 1e-10).sum() == 2


def test_one_open_region_one_closed(problems, tmp_path):
    """Opening x- vents the left half only: one null vector remains."""
    nx, ny, nz = 7, 5, 6
    flags = np.zeros((nz, ny, nx), np.int8)
    flags[:, :, 3] = SOLID
    np.save(tmp_path / "f.npy", flags)
    f, faces = make_flags("file", (nz, ny, nx), 0, flags_file=str(tmp_path / "f.npy"),
                          open_faces={"x-"})
    p = problems(f, faces, seed=0)
    assert p.closed_regions == 1
    (v,) = [w.getArray(readonly=True) for w in p.nullspace.getVecs()]
    assert np.all(v.reshape(nz, ny, nx)[:, :, :3] == 0)
    assert np.all(v.reshape(nz, ny, nx)[:, :, 4:] > 0)
    assert_same(petsc_csr(p.A), reference_matrix(f, faces))


@pytest.mark.parametrize("scene", GEN_SCENES)
def test_make_flags_deterministic(scene):
    a, fa = make_flags(scene, (7, 6, 9), 11)
    b, fb = make_flags(scene, (7, 6, 9), 11)
    assert np.array_equal(a, b) and fa == fb


def test_make_flags_seed_matters():
    a, _ = make_flags("spheres", (16, 16, 16), 1)
    b, _ = make_flags("spheres", (16, 16, 16), 2)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("scene", GEN_SCENES)
def test_non_cubic_shapes(scene):
    shape = (9, 4, 6)  # (nx, ny, nz)
    p = Problem.from_scene(scene, shape, seed=3, comm=PETSc.COMM_SELF)
    try:
        assert p.shape == shape
        assert p.flags.shape == (6, 4, 9)
        assert p.A.getSize() == (9 * 4 * 6,) * 2
        assert_same(petsc_csr(p.A), reference_matrix(p.flags, p.open_faces))
    finally:
        p.destroy()


def test_make_flags_errors(tmp_path):
    with pytest.raises(UserError):
        make_flags("nope", (5, 5, 5))
    with pytest.raises(UserError):
        make_flags("file", (5, 5, 5))
    np.save(tmp_path / "solid.npy", np.ones((5, 5, 5), np.int8))
    with pytest.raises(UserError, match="no fluid"):
        make_flags("file", (5, 5, 5), flags_file=str(tmp_path / "solid.npy"))


@pytest.mark.parametrize("sizes", [([3, 2], [2, 2, 1], [4, 3]),
                                   ([5], [5], [5]),
                                   ([1, 4, 2], [3], [2, 2])])
def test_layout_round_trip(sizes):
    lay = Layout(*sizes)
    nx, ny, nz = (sum(s) for s in sizes)
    assert lay.shape_xyz == (nx, ny, nz)
    N = nx * ny * nz
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    nat = (i + nx * (j + ny * k)).ravel()
    pet = lay.petsc_index(k, j, i).ravel()
    assert np.array_equal(np.sort(pet), np.arange(N))  # bijection onto 0..N-1
    assert np.array_equal(lay.natural_index(pet), nat)
    inv = lay.natural_index(np.arange(N))
    assert np.array_equal(np.sort(inv), np.arange(N))
    assert np.array_equal(lay.petsc_index(*np.unravel_index(inv, (nz, ny, nx))), np.arange(N))
    # each rank's block is contiguous in PETSc numbering, ranks x fastest
    px, py, pz = lay.procs
    for r in range(px * py * pz):
        (xs, xe), (ys, ye), (zs, ze) = lay.box(r)
        kk, jj, ii = np.meshgrid(np.arange(zs, ze), np.arange(ys, ye), np.arange(xs, xe),
                                 indexing="ij")
        idx = lay.petsc_index(kk, jj, ii).ravel()
        assert np.array_equal(idx, np.arange(lay.offset[r], lay.offset[r + 1]))


def test_layout_matches_petsc_ao():
    """Layout of a real (serial) DMDA agrees with PETSc's own AO."""
    da = PETSc.DMDA().create(dim=3, sizes=(6, 5, 7), comm=PETSc.COMM_SELF)
    try:
        lay = Layout.from_da(da)
        ao = da.getAO()
        N = 6 * 5 * 7
        assert np.array_equal(ao.app2petsc(np.arange(N, dtype=PETSc.IntType)),
                              lay.petsc_index(*np.unravel_index(np.arange(N), (7, 5, 6))))
    finally:
        da.destroy()
