"""The operator families without PETSc (training, evaluate): the torch
operator and stencil equal the assembled PETSc matrix, Lanczos caches keep
the stencil, and the torch DCDM takes the PETSc DCDM's iterations."""
import numpy as np
import pytest
import torch
from petsc4py import PETSc

from deepcd_petsc import stencil
from deepcd_petsc.coefficients import scene_operator
from deepcd_petsc.evaluate import TorchSystem, dcdm
from deepcd_petsc.model import dirichlet_fraction, load_model
from deepcd_petsc.operator import StencilOperator
from deepcd_petsc.problem import Problem
from deepcd_petsc.training.data import make_geometry
from test_ksp import DCDM, make_ksp, solve

FAMILIES = ["density", "perm", "aniso", "stretch", "periodic"]
SHAPE = (12, 10, 16)       # (nz, ny, nx)


@pytest.mark.parametrize("fam", FAMILIES)
def test_torch_operator_equals_petsc_matrix(fam):
    nz, ny, nx = SHAPE
    p = Problem.from_scene(fam, (nx, ny, nz), seed=7, comm=PETSc.COMM_SELF)
    try:
        ref = stencil.from_aij(p.da, p.A, SHAPE)
        flags, faces, st = scene_operator(fam, SHAPE, 7)
        assert np.array_equal(flags, p.flags)
        assert np.allclose(st.diag, ref.diag, rtol=1e-13) and np.allclose(st.coef, ref.coef, rtol=1e-13)
        assert st.periodic == ref.periodic
        x = p.da.createGlobalVec()
        x.setRandom()
        y = x.duplicate()
        p.A.mult(x, y)
        op = StencilOperator(st)
        got = op(torch.from_numpy(x.getArray(readonly=True).reshape(SHAPE).copy()))
        want = y.getArray(readonly=True).reshape(SHAPE)
        assert np.abs(got.numpy() - want).max() <= 1e-12 * np.abs(want).max()
        x.destroy()
        y.destroy()
    finally:
        p.destroy()


@pytest.mark.parametrize("fam", FAMILIES)
def test_2d_family_matrix_equals_torch_operator(fam):
    """The 2D families' open face is y+: the PETSc matrix of `deepcd solve
    --dim 2` is training's operator (it had z+, a Dirichlet face at every cell)."""
    ny, nx = 14, 18
    p = Problem.from_scene(fam, (nx, ny, 1), seed=4, comm=PETSc.COMM_SELF)
    try:
        flags, faces, st = scene_operator(fam, (1, ny, nx), 4)
        assert faces == {"y+"} and p.open_faces == faces
        assert np.array_equal(flags, p.flags)
        x = p.da.createGlobalVec()
        x.setRandom()
        y = x.duplicate()
        p.A.mult(x, y)
        got = StencilOperator(st)(torch.from_numpy(x.getArray(readonly=True).reshape(1, ny, nx).copy()))
        want = y.getArray(readonly=True)
        assert np.abs(got.numpy().ravel() - want).max() <= 1e-12 * np.abs(want).max()
        # fluid rows away from the top have no Dirichlet part
        excess = (st.diag - st.coef.sum(0))[0, :-1]
        assert np.abs(excess[flags[0, :-1] == 0]).max() < 1e-12 * st.diag.max()
        x.destroy()
        y.destroy()
    finally:
        p.destroy()


def test_lanczos_cache_keeps_the_stencil(tmp_path):
    g1 = make_geometry("stretch", (8, 8, 8), 3, 20, str(tmp_path))
    g2 = make_geometry("stretch", (8, 8, 8), 3, 20, str(tmp_path))   # from the cache
    assert g1.stencil is not None and g2.stencil is not None
    assert np.array_equal(g1.stencil.coef, g2.stencil.coef)
    assert g2.stencil.periodic == g1.stencil.periodic
    kw = g2.prepare_kw
    assert kw["stencil"].shape == (7, 8, 8, 8)
    # Ritz pairs of the family's operator (Rayleigh quotients qᵀAq = θ),
    # not of the unit operator of its flags
    from deepcd_petsc.operator import PoissonOperator
    for k in (0, 10, 19):
        q = torch.zeros(512, dtype=torch.float64)
        q[g2.fluid_idx] = g2.ritz_vectors[k].double()
        q /= q.norm()
        lam = float(g2.ritz_values[k])
        rq = float(q @ StencilOperator(g2.stencil)(q.reshape(8, 8, 8)).reshape(-1))
        unit = float(q @ PoissonOperator(g2.flags, g2.open_faces)(q.reshape(8, 8, 8)).reshape(-1))
        assert abs(rq - lam) <= 1e-4 * lam, (k, rq, lam)
        assert abs(unit - lam) > 1e-2 * lam, (k, unit, lam)


@pytest.mark.parametrize("fam", ["density", "stretch", "periodic"])
def test_torch_dcdm_matches_petsc_dcdm(fam):
    """The two DCDM loops (evaluate.dcdm, the KSP) on the same operator and
    network: the same iteration counts within one."""
    net, _ = load_model()
    s = TorchSystem(fam, (16, 16, 16), 5)
    kw = {"stencil": torch.from_numpy(np.concatenate([s.stencil.diag[None], s.stencil.coef])),
          "periodic": s.stencil.periodic}
    with torch.inference_mode():
        geo = net.prepare(s.flags, dirichlet_fraction(s.flags, s.faces), **kw)
    its_torch, hist = dcdm(s, net, geo, rtol=1e-6, maxit=300)
    assert hist[-1] <= 1e-6
    p = Problem.from_scene(fam, (16, 16, 16), seed=5, comm=PETSc.COMM_SELF)
    try:
        # (the torch loop has no island deflation, and keeps the V-cycle)
        with make_ksp(p.A, "td_", {**DCDM, "ksp_rtol": 1e-6, "ksp_max_it": 300,
                                   "ksp_dcdm_deflate": "0", "ksp_dcdm_kcycle": "0"}, da=p.da) as ksp:
            reason, its, res, x = solve(ksp, p)
        x.destroy()
    finally:
        p.destroy()
    assert reason == "CONVERGED_RTOL"
    # the KSP adds the safeguard (Jacobi directions on stagnation)
    assert abs(its - its_torch) <= max(1, 0.1 * its), (its, its_torch)
