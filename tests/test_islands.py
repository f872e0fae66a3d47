"""Island deflation (islands.py): which regions are islands, E = ZᵀAZ and
the projection against the assembled matrix, on 1–3 ranks, and what it
does to DCDM's iterations."""
import json

import numpy as np
import pytest
from petsc4py import PETSc
from scipy import ndimage

from deepcd_petsc import islands
from deepcd_petsc.coefficients import Coefficients, family
from deepcd_petsc.problem import Problem
from deepcd_petsc.scenes import remove_isolated_fluid
from deepcd_petsc.stencil import from_coefficients
from helpers import REPO, run_cli, run_mpi
from test_ksp import DCDM, make_ksp, solve, view_text

CHECK = REPO / "tests" / "mpi" / "check_islands.py"


def _serial_da(shape_zyx, periodic=(False, False, False)):
    bt = [PETSc.DM.BoundaryType.PERIODIC if p else PETSc.DM.BoundaryType.NONE
          for p in periodic[::-1]]
    return PETSc.DMDA().create(dim=3, sizes=shape_zyx[::-1], dof=1, stencil_width=1,
                               boundary_type=bt, comm=PETSc.COMM_SELF)


def _islands(flags, faces, coef):
    """(stencil, islands.find's answer) of a whole grid on one process."""
    flags = remove_isolated_fluid(flags, faces, coef.periodic)
    st = from_coefficients(flags, faces, coef)
    da = _serial_da(flags.shape, coef.periodic)
    try:
        return st, islands.find(da, st)
    finally:
        da.destroy()


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_density_islands_are_the_bubbles(seed):
    """Each island is one connected bubble of the light phase, and every
    bubble clear of the walls and the Dirichlet top is one."""
    shape = (40, 40, 40)
    flags, faces, coef = family("density", shape, seed)
    _, isl = _islands(flags, faces, coef)
    assert isl is not None and isl.count >= 1
    comps, ncomp = ndimage.label(coef.k > 1.0)
    found = []
    for i in range(isl.count):
        cells = isl.labels == i
        ids = np.unique(comps[cells])
        assert ids.size == 1 and ids[0] > 0, ids            # inside one bubble …
        assert np.array_equal(cells, comps == ids[0])      # … and all of it
        found.append(int(ids[0]))
    for c in range(1, ncomp + 1):
        m = comps == c
        zz, yy, xx = np.nonzero(m)
        clear = (zz.min() > 0 and zz.max() < shape[0] - 1 and yy.min() > 0 and
                 yy.max() < shape[1] - 1 and xx.min() > 0 and xx.max() < shape[2] - 1)
        if clear and m.sum() >= 27:
            assert c in found, (c, int(m.sum()))


@pytest.mark.parametrize("scene", ["perm", "aniso", "periodic"])
def test_no_islands_in_the_other_families(scene):
    """No islands: no jump or anisotropy of CONTRAST between neighbours (no
    graph is built: periodic), jumps without a region decoupled by them
    (a log-normal field on a coarse grid), or strongly coupled lines only
    (aniso's z-lines, which the network's semi-coarsening serves)."""
    shape = (24, 24, 24)
    flags, faces, coef = family(scene, shape, 3)
    _, isl = _islands(flags, faces, coef)
    assert isl is None or isl.count == 0
    if scene != "perm":
        assert isl is None


def test_stretch_islands_are_the_tall_layers():
    """Graded cells (hz growing 1.08 per layer): the layers whose cells are
    so tall that their in-layer couplings are ≥ 10× their z-couplings are
    islands, one each and whole; the flat layers below (z-lines) are not."""
    shape = (48, 24, 24)
    flags, faces, coef = family("stretch", shape, 1)
    st, isl = _islands(flags, faces, coef)
    active = st.active()
    hz = coef.h[0]
    assert isl is not None and isl.count >= 5
    layers = sorted(int(np.unique(np.nonzero(isl.labels == i)[0])[0]) for i in range(isl.count))
    for i in range(isl.count):
        zz = np.unique(np.nonzero(isl.labels == i)[0])
        assert zz.size == 1 and np.array_equal(isl.labels[zz[0]] == i, active[zz[0]])
    # the layers above the first one are all in, up to the Dirichlet top one
    assert layers == list(range(layers[0], layers[0] + len(layers)))
    assert hz[layers[0]] > 2.0 and layers[-1] >= shape[0] - 2
    assert (isl.labels[:layers[0]] < 0).all()


def test_2d_stretch_islands_are_the_tall_rows():
    """In 2D a row is codimension one, the 2D layer: the rows of cells so
    tall (hy growing 1.08 per row) that their x-couplings are ≥ 10× their
    y-couplings are islands, one each and whole (3D lines are not: the
    rod below)."""
    shape = (1, 96, 40)
    flags, faces, coef = family("stretch", shape, 1)
    st, isl = _islands(flags, faces, coef)
    active = st.active()
    assert isl is not None and isl.count >= 5
    rows = sorted(int(np.unique(np.nonzero(isl.labels[0] == i)[0])[0]) for i in range(isl.count))
    for i in range(isl.count):
        yy = np.unique(np.nonzero(isl.labels[0] == i)[0])
        assert yy.size == 1 and np.array_equal(isl.labels[0, yy[0]] == i, active[0, yy[0]])
    assert rows == list(range(rows[0], rows[0] + len(rows)))
    assert coef.h[1][rows[0]] > 2.0 and (isl.labels[0, :rows[0]] < 0).all()


def test_ksp_2d_stretch_rows(tmp_path):
    """2D graded cells at 128² (aspect 1.7·10⁴ at the top): with the rows
    deflated DCDM converges in 20 here; without, not in 150 (GAMG: > 5000)."""
    p = Problem.from_scene("stretch", (128, 128, 1), seed=1)
    its, reasons = {}, {}
    try:
        for d in ("1", "0"):
            with make_ksp(p.A, f"s2{d}_", {**DCDM, "ksp_rtol": 1e-6, "ksp_dcdm_threads": 1,
                                           "ksp_max_it": 150, "ksp_dcdm_deflate": d},
                          da=p.da) as ksp:
                reasons[d], its[d], res, x = solve(ksp, p)
                text = view_text(ksp, tmp_path, f"{d}.txt")
            x.destroy()
            if d == "1":
                assert reasons[d] == "CONVERGED_RTOL" and res <= 1e-6 and its[d] <= 40, (its, res)
                assert "island(s)" in text, text
    finally:
        p.destroy()
    assert reasons["0"] == "DIVERGED_MAX_IT", (reasons, its)


@pytest.mark.parametrize("what", ["rod", "touching_top"])
def test_strong_regions_that_are_not_islands(what):
    """A strongly coupled rod (couplings along one axis only) is not an
    island: the network's semi-coarsening has such lines; a region pinned
    by the Dirichlet top is not a near-null vector. A ball beside them is."""
    shape = (20, 20, 20)
    flags, faces, _ = family("aniso", shape, 1)
    k = np.ones(shape)
    if what == "rod":
        k[10, 10, 2:18] = 1e3
    else:
        k[12:, 5:12, 5:12] = 1e3      # reaches z = nz − 1, the open top
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ball = (z - 5) ** 2 + (y - 14) ** 2 + (x - 14) ** 2 <= 9
    k[ball] = 1e3
    coef = Coefficients(k, np.ones(20), np.ones(20), np.ones(20), (False, False, False))
    _, isl = _islands(flags, faces, coef)
    assert isl.count == 1 and np.array_equal(isl.labels == 0, ball)


@pytest.mark.mpi
def test_deflation_matches_the_matrix_on_ranks():
    """On an operator assembled by the test (ellipsoids, periodic x with a
    bubble across the wrap): the three bubbles, E = ZᵀAZ equal to MatMults
    with the indicator Vecs, projected directions A-orthogonal to every
    indicator, and the same islands, E and iterations on 1, 2 and 3 ranks."""
    out = {}
    for n in (1, 2, 3):
        r = run_mpi(n, [CHECK], timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    for n, o in out.items():
        assert o["count"] == 3 and sorted(o["sizes"]) == o["expected_sizes"], o
        assert o["E_error"] < 1e-12 and o["projection"] < 1e-12, o
        assert o["reason"] > 0 and o["true_residual"] <= 1e-6, o
        assert o["iterations"] == out[1]["iterations"], (n, o["iterations"], out[1]["iterations"])
        assert o["first"] == out[1]["first"]
        assert np.allclose(o["E"], out[1]["E"], rtol=1e-12, atol=0)


def test_ksp_deflates_density(tmp_path):
    """Fewer iterations than without (and than the same m without), m = 4
    unless given, and what -ksp_view says in each case."""
    p = Problem.from_scene("density", (32, 32, 32), seed=1)
    runs = {}
    try:
        for name, extra in (("on", {}), ("off", {"ksp_dcdm_deflate": "0"}),
                            ("off4", {"ksp_dcdm_deflate": "0", "ksp_dcdm_northo": "4"}),
                            ("m2", {"ksp_dcdm_northo": "2"})):
            with make_ksp(p.A, f"isl{name}_", {**DCDM, "ksp_rtol": 1e-6, "ksp_dcdm_threads": 1,
                                               **extra}, da=p.da) as ksp:
                reason, its, res, x = solve(ksp, p)
                runs[name] = (reason, its, res, view_text(ksp, tmp_path, f"{name}.txt"))
            x.destroy()
    finally:
        p.destroy()
    for reason, its, res, _ in runs.values():
        assert reason == "CONVERGED_RTOL" and res <= 1e-6
    on, off, off4, m2 = (runs[k] for k in ("on", "off", "off4", "m2"))
    assert on[1] < off[1] and on[1] < off4[1] and m2[1] < off[1], {k: v[1] for k, v in runs.items()}
    assert "island deflation: 3 island(s)" in on[3] and "m = 4" in on[3], on[3]
    assert "DCDM: 4 A-orthogonalised" in on[3]
    assert "DCDM: 2 A-orthogonalised" in m2[3] and "m = 4" not in m2[3]
    assert "island deflation: off (-ksp_dcdm_deflate 0)" in off[3] and "DCDM: 2 A-" in off[3]


def test_ksp_stretch_layers(tmp_path):
    """The graded family: fewer iterations with its layers deflated."""
    p = Problem.from_scene("stretch", (48, 48, 48), seed=1)
    its = {}
    try:
        for d in ("1", "0"):
            # the V-cycle both times (without islands the K-cycle would be
            # switched on at iteration 6: ksp.KCYCLE_AT)
            with make_ksp(p.A, f"st{d}_", {**DCDM, "ksp_rtol": 1e-6, "ksp_dcdm_threads": 1,
                                           "ksp_dcdm_deflate": d, "ksp_dcdm_kcycle": "0"},
                          da=p.da) as ksp:
                reason, its[d], res, x = solve(ksp, p)
                text = view_text(ksp, tmp_path, f"{d}.txt")
            x.destroy()
            assert reason == "CONVERGED_RTOL" and res <= 1e-6
            if d == "1":
                assert "island(s)" in text and "box(es)" in text, text
    finally:
        p.destroy()
    assert its["1"] <= its["0"] - 4, its     # 12 against 19 here


def test_ksp_view_without_islands(tmp_path):
    p = Problem.from_scene("aniso", (16, 16, 16), seed=1)
    try:
        with make_ksp(p.A, "islp_", {**DCDM, "ksp_rtol": 1e-6}, da=p.da) as ksp:
            reason, _, _, x = solve(ksp, p)
            text = view_text(ksp, tmp_path)
        x.destroy()
    finally:
        p.destroy()
    assert reason == "CONVERGED_RTOL"
    assert "island deflation: none (no cell coupled strongly along two axes" in text, text
    assert "DCDM: 2 A-orthogonalised" in text


def test_deflation_with_a_nonzero_initial_guess():
    """x₀ += Z E⁺ Zᵀ r from the guess's residual: the same solution."""
    p = Problem.from_scene("density", (32, 32, 32), seed=1)
    try:
        x = p.b.duplicate()
        x.setRandom()
        with make_ksp(p.A, "isg_", {**DCDM, "ksp_rtol": 1e-8, "ksp_initial_guess_nonzero": "1"},
                      da=p.da) as ksp:
            reason, its, res, x = solve(ksp, p, x=x)
        x.destroy()
    finally:
        p.destroy()
    assert reason == "CONVERGED_RTOL" and res <= 1e-7 and its <= 40, (reason, its, res)


def test_deflate_box_option_validated():
    r = run_cli(["solve", "--scene", "density", "--n", "8", "-ksp_type", "python",
                 "-ksp_python_type", "deepcd_petsc.DCDM", "-ksp_dcdm_deflate_box", "-2"])
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "deflate_box must be >= 0" in lines[0], r.stderr
