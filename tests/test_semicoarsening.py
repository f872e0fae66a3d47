"""Semi-coarsening of anisotropic operators (mgnet.coarsening_plan): the
plan, the Galerkin property of semi-coarsened levels, the aligned
decomposition that carries a plan across ranks, and what it buys."""
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers import run_cli, run_cli_mpi
from test_stencil import local_shape, max_abs, nat, problem, stencil_matrix, to_scipy

from deepcd_petsc import stencil
from deepcd_petsc.halo import Decomposition
from deepcd_petsc.mgnet import (DENSE_CELLS, axis_strengths, coarsening_plan, galerkin_coarsen,
                                galerkin_factor, levels_for, plan_multiples)
from deepcd_petsc.scenes import FLUID

DCDM = ["-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM", "-ksp_dcdm_threads", "1"]


# ------------------------------------------------------------------ the plan
@pytest.mark.parametrize("shape", [(64, 64, 64), (32, 48, 64), (17, 33, 129), (8, 8, 8)])
def test_isotropic_cube_plan_is_full_coarsening(shape):
    plan = coarsening_plan(shape, 7, 4, strengths=(1.0, 1.0, 1.0, 10))
    full = levels_for(shape, 7, 4) - 1
    # full coarsening while every axis can; then only the long axes, and
    # never a semi-coarsened level below DENSE_CELLS cells
    assert plan[:full] == [(2, 2, 2)] * full
    cells = np.prod(shape) / 8 ** full
    for f in plan[full:]:
        assert cells > DENSE_CELLS and f != (2, 2, 2)
        cells /= np.prod(f)
    assert coarsening_plan(shape, 7, 4) == [(2, 2, 2)] * full        # flags: no strengths


def test_anisotropic_plan_coarsens_the_strong_axis_first():
    # z coupled 16× more strongly than x and y (hz = hx/4): z alone halves
    # until the Galerkin couplings are within 2× (16 → 8 → 4 → 2), then all
    plan = coarsening_plan((128, 128, 128), 7, 4, strengths=(16.0, 1.0, 1.0, 1))
    assert plan[:4] == [(2, 1, 1)] * 3 + [(2, 2, 2)]
    # weak z (cells stretched along z): x and y first
    plan = coarsening_plan((128, 128, 128), 7, 4, strengths=(1.0, 16.0, 16.0, 1))
    assert plan[:4] == [(1, 2, 2)] * 3 + [(2, 2, 2)]
    assert len(plan) <= 6


def test_plan_respects_coarsest_and_periodic_lengths():
    plan = coarsening_plan((8, 64, 64), 7, 4, strengths=(16.0, 1.0, 1.0, 1))
    # z stops at 4 cells; a periodic x of 24 cells halves at most 3 times
    assert plan_multiples(plan)[0] == 2
    plan = coarsening_plan((64, 64, 24), 7, 4, (False, False, True), strengths=(1.0, 1.0, 1.0, 1))
    assert 24 % plan_multiples(plan)[2] == 0 and plan_multiples(plan)[2] <= 8
    # a periodic axis of odd length coarsens too (its last aggregate is
    # ragged): ex66's 257 cells as often as a padded 257
    for per in (False, True):
        plan = coarsening_plan((1, 257, 257), 7, 4, (False, False, per), strengths=(0.0, 1.0, 1.0, 1))
        assert plan_multiples(plan)[1:] == (64, 64), plan


@pytest.mark.parametrize("scene,expect", [("aniso", (2, 1, 1)), ("stretch", (1, 2, 2)),
                                          ("density", (2, 2, 2)), ("perm", (2, 2, 2))])
def test_family_strengths_choose_the_first_coarsening(scene, expect):
    from deepcd_petsc.coefficients import scene_operator
    _, _, st = scene_operator(scene, (32, 32, 32), 11)
    s = axis_strengths(st.packed())
    assert s[3] > 0 and np.isclose(s[:3].sum(), s[3])     # fractions of each row sum to 1
    assert coarsening_plan((32, 32, 32), 7, 4, st.periodic, s)[0] == expect


# ------------------------------------------------------------------ Galerkin
def aggregation(shape_zyx, f):
    """P of piecewise-constant aggregation; an odd axis' last aggregate
    takes three cells."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    coarse = tuple(n // q for n, q in zip(shape_zyx, f))
    n = int(np.prod(shape_zyx))
    parent = [np.minimum(ax // q, nc - 1) for ax, q, nc in zip((k, j, i), f, coarse)]
    return sp.csr_matrix((np.ones(n), (nat(k, j, i, shape_zyx).ravel(), nat(*parent, coarse).ravel())),
                         shape=(n, int(np.prod(coarse))))


@pytest.mark.parametrize("scene", ["aniso", "density", "periodic"])
@pytest.mark.parametrize("f", [(2, 1, 1), (1, 2, 2), (1, 1, 2), (2, 2, 1), (2, 2, 2)])
@pytest.mark.parametrize("shape", [(8, 6, 10), (7, 5, 9)])
@pytest.mark.parametrize("impl", ["torch", "C"])
def test_semicoarsened_galerkin_is_ptap(scene, f, shape, impl):
    """galerkin_coarsen, and its one-pass C kernel (set-up on the CPU, even
    lengths), is PᵀAP of the active rows for aggregates of factors f; also
    on odd lengths, where the last aggregate takes three cells (the periodic
    scene's y and x wrap there: mgnet._merge_odd)."""
    from deepcd_petsc import kernels
    if impl == "C" and any(k == 2 and n % 2 for k, n in zip(f, shape)):
        pytest.skip("odd lengths coarsen in torch")
    p = problem(scene, shape, seed=3)
    st = stencil.from_aij(p.da, p.A, local_shape(p.da))
    active = p.flags == FLUID
    t = torch.from_numpy
    a = t(active.astype(np.float64))[None, None]
    g = galerkin_factor(f)
    args = (t(st.diag)[None, None], t(st.coef)[None] * a)
    if impl == "torch":
        d, c = galerkin_coarsen(*args, a, f)
    else:
        d, c, scale = kernels.galerkin(*args, a.float(), f, g)
        ref = torch.nn.functional.avg_pool3d((args[0] * a).abs(), f) * np.prod(f)
        assert torch.allclose(scale, ref, rtol=1e-14, atol=0)
    cd, cc = (d[0, 0] * g).numpy(), (c[0] * g).numpy()
    D = sp.diags(active.ravel().astype(float))
    Sa = sp.csr_matrix(D @ to_scipy(p.A) @ D)
    P = aggregation(p.flags.shape, f)
    C = sp.csr_matrix(P.T @ Sa @ P)
    assert max_abs(C - stencil_matrix(cd, cc, p.periodic)) <= 1e-13 * max_abs(C)


# ------------------------------------------------------------------ ranks
def test_decomposition_aligns_each_axis_to_its_plan():
    plan = [(2, 1, 1), (2, 1, 1), (2, 2, 2)]          # (z, y, x) factors
    d = Decomposition((24, 20, 40), None, 4, 0, plan=plan)      # (x, y, z)
    assert d.multiples == (2, 2, 8) and d.padded == (24, 20, 40)
    for r in range(4):
        dr = Decomposition((24, 20, 40), None, 4, r, plan=plan)
        for (lo, hi), m in zip(dr.block, dr.multiples):
            assert lo % m == 0 and hi % m == 0
    assert Decomposition((24, 20, 40), 4, 4, 0).plan == [(2, 2, 2)] * 2


def test_ragged_periodic_axis_blocks_and_levels():
    """An odd periodic axis is not padded: blocks start on multiples, the
    last ends at the grid's end and holds the three-cell last aggregates,
    and each level is floor(n / divisor) long on every rank (own_block of
    the whole level gives the block's cells)."""
    from deepcd_petsc.halo import HaloExchange, level_padding
    from deepcd_petsc.mgnet import gather_level
    plan = [(1, 2, 2)] * 4 + [(1, 1, 2)] * 2
    g, fine, coarse = level_padding((1, 37, 257), plan, gather_level, (False, False, True))
    assert fine[2] == 257 and fine[1] % 2 ** g == 0
    assert coarse[2] == 257 // 2 ** g
    for size in (2, 3, 4):
        cells = set()
        for r in range(size):
            d = Decomposition((257, 37, 1), None, size, r, periodic=(True, False, False),
                              plan=plan, gather=gather_level)
            assert d.padded[0] == 257
            if not d.active:
                continue
            (x0, x1), _, _ = d.block
            assert x0 % d.multiples[0] == 0 and x1 <= 257
            assert x1 < 257 or x0 <= 257 - d.multiples[0] - 1
            h = HaloExchange.__new__(HaloExchange)
            h.dec = d
            for lev in range(len(plan) + 1):
                shape = h.level_shape(lev)
                assert shape[2] == 257 // 2 ** min(lev, 6), (lev, shape)
            whole = torch.arange(257.0)[None, None, None, None].expand(1, 1, 1, 1, 257)
            cells.update(h.own_block(whole, 0)[..., 0, 0, :].reshape(-1).tolist())
        assert cells == set(range(257))
    # an aligned DMDA split whose last block is too short for the last
    # aggregate (256 + 1 cells) is not used as it is
    d = Decomposition((257, 37, 1), None, 2, 1, ranges=([256, 1], [37], [1]),
                      periodic=(True, False, False), plan=plan, gather=gather_level)
    assert d.block[0][0] <= 257 - d.multiples[0] - 1


@pytest.mark.mpi
@pytest.mark.parametrize("scene", ["aniso", "stretch"])
def test_semicoarsened_levels_on_ranks_equal_serial(scene):
    """Semi-coarsened levels on 2 and 4 ranks (blocks aligned per axis):
    serial iterations and solution to rounding."""
    args = ["solve", "--scene", scene, "--shape", "20,24,32", "--seed", "4", "--json",
            "-ksp_rtol", "1e-6", *DCDM]
    out = {}
    for n in (1, 2, 4):
        r = run_cli_mpi(n, args)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    for n in (2, 4):
        assert out[n]["iterations"] == out[1]["iterations"], out
        assert abs(out[n]["true_residual"] - out[1]["true_residual"]) <= 2e-2 * out[1]["true_residual"]


# ------------------------------------------------------------------ what it buys
@pytest.mark.parametrize("scene,seed", [("aniso", 13), ("stretch", 13)])
def test_anisotropic_families_not_worse_than_gamg(scene, seed):
    its = {}
    for name, opts in (("dcdm", DCDM), ("gamg", ["-ksp_type", "cg", "-pc_type", "gamg"])):
        r = run_cli(["solve", "--scene", scene, "--n", "32", "--seed", str(seed), "--json",
                     "-ksp_rtol", "1e-6", *opts])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["true_residual"] <= 1e-6
        its[name] = res["iterations"]
    assert its["dcdm"] <= its["gamg"], its


@pytest.mark.parametrize("f", [(2, 2, 2), (1, 2, 2), (2, 1, 2), (1, 1, 2), (2, 2, 1)])
def test_max_children_is_max_pool(f):
    """The set-up's per-axis children maximum equals F.max_pool3d."""
    from deepcd_petsc.mgnet import max_children
    x = torch.rand((2, 1, 4, 6, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(max_children(x, f), torch.nn.functional.max_pool3d(x, f))


def test_level_cap_does_not_leave_a_large_semi_coarsened_bottom():
    """Three different spacings (hx:hy:hz = 1:3:1/5): semi-coarsening only
    ever halved z and x before the level cap, and left a 4×64×16 bottom
    whose dense inverse took 1.8 s of set-up and 8 MatMults an
    application; the last coarsenings now halve every axis they can."""
    from deepcd_petsc.mgnet import DENSE_CELLS, _bottom_cells, describe_plan
    s = (15.0, 0.067, 0.6, 1)
    plan = coarsening_plan((64, 64, 64), 7, 4, strengths=s)
    assert describe_plan(plan) == "z, z, z, z, yx, yx"
    assert _bottom_cells((64, 64, 64), plan) <= DENSE_CELLS
    # where the dense bottom is cheap next to the grid it stays (aniso 256³)
    plan = coarsening_plan((256, 256, 256), 7, 4, strengths=(16.0, 1.0, 1.0, 1))
    assert describe_plan(plan) == "z, z, z, zyx, zyx, zyx"
    # a bottom past the dense inverse (only smoothed) is never left
    plan = coarsening_plan((1, 4096, 4096), 7, 4, strengths=(0.0, 1.0, 16.0, 1))
    assert _bottom_cells((1, 4096, 4096), plan) <= 4096
