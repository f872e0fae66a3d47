"""DCDM on operators with coefficients (operator families): the network
reads A's stencil, assembled or probed, and DCDM still converges where the
network does not help (the switch to Jacobi-PCG)."""
import numpy as np
import pytest
import torch
from petsc4py import PETSc

from deepcd_petsc.model import load_model, save_checkpoint
from deepcd_petsc.problem import Problem
from helpers import run_cli
from test_ksp import DCDM, make_ksp, solve, view_text

FAMILIES = ["density", "perm", "aniso", "stretch", "periodic"]


@pytest.fixture(scope="module")
def families():
    out = {f: Problem.from_scene(f, (16, 14, 12), seed=5) for f in FAMILIES}
    yield out
    for p in out.values():
        p.destroy()


class Shell:
    """A matrix-free operator: only mult."""

    def __init__(self, A):
        self.A = A

    def mult(self, mat, x, y):
        self.A.mult(x, y)


def shell_of(A):
    m = PETSc.Mat().createPython(A.getSizes(), Shell(A), comm=A.getComm())
    m.setUp()
    return m


@pytest.mark.parametrize("fam", FAMILIES)
def test_dcdm_reads_the_operator(families, fam, tmp_path):
    p = families[fam]
    with make_ksp(p.A, "oa_", {**DCDM, "ksp_rtol": 1e-6, "ksp_max_it": 300}, da=p.da) as ksp:
        reason, its, res, x = solve(ksp, p)
        text = view_text(ksp, tmp_path)
    x.destroy()
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)
    assert "operator's 7-point coefficients (AIJ)" in text, text


@pytest.mark.parametrize("fam", FAMILIES)
def test_shell_operator_is_probed(families, fam, tmp_path):
    """A MATSHELL takes the same iterations (±1) as the assembled matrix."""
    p = families[fam]
    its = {}
    for kind in ("aij", "shell"):
        A = p.A if kind == "aij" else shell_of(p.A)
        with make_ksp(A, "sh_", {**DCDM, "ksp_rtol": 1e-6, "ksp_max_it": 300}, da=p.da) as ksp:
            reason, its[kind], res, x = solve(ksp, p)
            text = view_text(ksp, tmp_path)
        x.destroy()
        assert reason == "CONVERGED_RTOL" and res <= 1e-6, (kind, reason, res)
        if kind == "shell":
            A.destroy()
            assert "probed" in text, text
    assert abs(its["aij"] - its["shell"]) <= 1, its


def test_unit_operator_keeps_flags_path(tmp_path):
    """An operator the flags path reproduces exactly (here a closed box)
    keeps it; obstacles touching an open face do not qualify (the derived
    AIR cells would add to the diagonal)."""
    p = Problem.from_scene("box", (16, 16, 16), seed=2)
    try:
        with make_ksp(p.A, "un_", {**DCDM, "ksp_rtol": 1e-6}, da=p.da) as ksp:
            reason, its, res, x = solve(ksp, p)
            text = view_text(ksp, tmp_path)
        x.destroy()
    finally:
        p.destroy()
    assert reason == "CONVERGED_RTOL" and its <= 9, (reason, its)
    assert "unit 7-point operator of the cell flags" in text, text


def test_coefficient_change_rebuilds(families, tmp_path):
    """Same flags, new coefficient values (A re-assembled in place): the
    network must follow the new operator, not keep the old levels."""
    p = families["perm"]
    with make_ksp(p.A, "cc_", {**DCDM, "ksp_rtol": 1e-6, "ksp_max_it": 300}, da=p.da) as ksp:
        solve(ksp, p)[3].destroy()
        ctx = ksp.getPythonContext()
        before = ctx.evaluator.geo["levels"][0]["diag"].clone()
        p.A.scale(1.0)                      # no change of values: state bump only
        ai, aj, av = p.A.getValuesCSR()
        rows = p.A.getOwnershipRange()
        # a jump of 100 in the first half of the rows
        import numpy as np
        scale = np.ones(rows[1] - rows[0])
        scale[: len(scale) // 2] = 100.0
        d = p.A.createVecLeft()
        d.setArray(scale)
        p.A.diagonalScale(d, d)             # D A D: SPD, other coefficients
        d.destroy()
        reason, its, res, x = solve(ksp, p)
        x.destroy()
        assert reason == "CONVERGED_RTOL" and res <= 1e-6
        after = ctx.evaluator.geo["levels"][0]["diag"]
        # the network's level 0 holds the new diagonal (D A D: scaled 1e4)
        assert not torch.allclose(after, before)
        h = len(scale) // 2
        assert torch.allclose(after.reshape(-1)[:h], 1e4 * before.reshape(-1)[:h], rtol=1e-5)


def _model(tmp_path_factory, name, value):
    net, _ = load_model()
    with torch.no_grad():
        if value is None:      # smoother taps that overflow float32: f(r) = NaN/Inf
            for m in net.modules():
                if hasattr(m, "kernel"):
                    m.kernel.fill_(3e38)
        elif value == "negated":   # smoothers that push the wrong way: usable, poor directions
            for m in net.modules():
                if hasattr(m, "kernel"):
                    m.kernel.mul_(-1.0)
        else:
            net.coarse_scale.fill_(value)
    path = tmp_path_factory.mktemp(name) / f"{name}.pt"
    save_checkpoint(str(path), net)
    return str(path)


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """The shipped network with its coarse correction reversed (SPD
    operators, poor directions) or with smoothers that overflow (no usable
    direction at all)."""
    return {"reversed": _model(tmp_path_factory, "reversed", -4.0),
            "negated": _model(tmp_path_factory, "negated", "negated"),
            "zero": _model(tmp_path_factory, "zero", None)}


def _cg_jacobi_its(p):
    with make_ksp(p.A, "cj_", {"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-6,
                               "ksp_norm_type": "unpreconditioned", "ksp_max_it": 2000},
                  da=p.da) as ksp:
        _, its, _, x = solve(ksp, p)
    x.destroy()
    return its


@pytest.mark.parametrize("fam", ["perm", "stretch"])
@pytest.mark.parametrize("kind", ["reversed", "negated", "zero"])
def test_useless_network_as_fast_as_jacobi_cg(families, fam, kind, bad_models, tmp_path):
    """No worse than CG + Jacobi (within 1.5x) with a network that does not
    help; a network with no usable direction switches to Jacobi-PCG, and
    -ksp_view says when."""
    p = families[fam]
    cg_its = _cg_jacobi_its(p)
    with make_ksp(p.A, "bd_", {**DCDM, "ksp_rtol": 1e-6, "ksp_max_it": 2000,
                               "ksp_dcdm_model": bad_models[kind]}, da=p.da) as ksp:
        reason, its, res, x = solve(ksp, p)
        text = view_text(ksp, tmp_path)
        switched = ksp.getPythonContext().switched_at
    x.destroy()
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)
    assert its <= 1.5 * cg_its + 20, (its, cg_its)
    if kind == "negated":     # Jacobi beats these directions: it switches
        assert switched is not None and "switched at iteration" in text, text
    if kind == "zero":
        assert switched == 7 and "switched at iteration 7" in text, text
        assert its <= cg_its + 12, (its, cg_its)


def test_switch_option_validated():
    r = run_cli(["solve", "--scene", "perm", "--n", "8", "-ksp_type", "python",
                 "-ksp_python_type", "deepcd_petsc.DCDM", "-ksp_dcdm_switch", "-1"])
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "switch must be >= 0" in lines[0], r.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("fam,shape,extra", [("density", "20,24,16", ()), ("stretch", "20,24,16", ()),
                                             ("periodic", "20,24,16", ()), ("periodic", "37,27,16", ()),
                                             ("perm", "37,27,21", ()),
                                             ("density", "37,27,16", ("-ksp_dcdm_kcycle", "2"))])
def test_family_same_iterations_on_ranks(fam, shape, extra):
    """The coefficient levels (Galerkin coarsening, gathered coarse
    levels, the coarsest pseudo-inverse) on 2 and 3 ranks: serial
    iterations, same solution to rounding; also on odd lengths, periodic
    or not (three-cell last aggregates in the last block of each axis);
    with K-cycles (their sums over the ranks) on the finest two levels."""
    import json
    from helpers import run_cli_mpi
    args = ["solve", "--scene", fam, "--shape", shape, "--seed", "4", "--json",
            "-ksp_rtol", "1e-6", "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
            "-ksp_dcdm_threads", "1", *extra]
    out = {}
    for n in (1, 2, 3):
        r = run_cli_mpi(n, args)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    for n in (2, 3):
        assert out[n]["iterations"] == out[1]["iterations"], out
        # the energy-optimal coarse weights sum over ranks in another order
        assert abs(out[n]["true_residual"] - out[1]["true_residual"]) <= 2e-2 * out[1]["true_residual"]


def test_periodic_levels_wrap():
    """Every level wraps the periodic axes (serial WrapPad, the halo on
    ranks): as few iterations as GAMG on a periodic box at 32³ (without the
    wrap: 40)."""
    p = Problem.from_scene("periodic", (32, 32, 32), seed=3)
    try:
        with make_ksp(p.A, "pw_", {**DCDM, "ksp_rtol": 1e-6}, da=p.da) as ksp:
            reason, its, res, x = solve(ksp, p)
        x.destroy()
        with make_ksp(p.A, "pg_", {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-6,
                                   "ksp_norm_type": "unpreconditioned"}, da=p.da) as ksp:
            _, gamg_its, _, x = solve(ksp, p)
        x.destroy()
    finally:
        p.destroy()
    assert reason == "CONVERGED_RTOL" and res <= 1e-6
    assert its <= gamg_its, (its, gamg_its)


def test_wrap_pad_matches_circular_padding():
    from deepcd_petsc.mgnet import WrapPad
    import torch.nn.functional as F
    x = torch.randn(1, 1, 4, 6, 8)
    for per in ((True, False, True), (False, True, False), (True, True, True)):
        got = WrapPad(per)(x, 1)
        ref = x
        for axis, p in zip((2, 3, 4), per):
            pad = [0] * 6
            if p:
                pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = 1
                ref = F.pad(ref, pad, mode="circular") if ref.dim() == 5 else ref
            else:
                pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = 1
                ref = F.pad(ref, pad)
        assert torch.equal(got, ref), per


def _ex45(nx, ny, nz):
    """PETSc's ex45 on an anisotropic grid (hx ≠ hz), as its C source
    assembles it: Dirichlet rows kept as diagonal rows, interior rows
    2(HyHz/Hx + HxHz/Hy + HxHy/Hz) and −HyHz/Hx, ... couplings."""
    da = PETSc.DMDA().create([nx, ny, nz], dof=1, stencil_width=1,
                             stencil_type=PETSc.DMDA.StencilType.STAR, comm=PETSc.COMM_SELF)
    Hx, Hy, Hz = 1.0 / (nx - 1), 1.0 / (ny - 1), 1.0 / (nz - 1)
    cx, cy, cz = Hy * Hz / Hx, Hx * Hz / Hy, Hx * Hy / Hz
    A = da.createMat()
    b = da.createGlobalVec()
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    with b as barr:
        barr = barr.reshape(nz, ny, nx)
        for k in range(nz):
            for j in range(ny):
                for i in range(nx):
                    row.index = (i, j, k)
                    d = 2 * (cx + cy + cz)
                    if 0 in (i, j, k) or i == nx - 1 or j == ny - 1 or k == nz - 1:
                        A.setValueStencil(row, row, d)
                        barr[k, j, i] = d
                        continue
                    A.setValueStencil(row, row, d)
                    for (di, dj, dk), c in (((1, 0, 0), cx), ((-1, 0, 0), cx), ((0, 1, 0), cy),
                                            ((0, -1, 0), cy), ((0, 0, 1), cz), ((0, 0, -1), cz)):
                        col.index = (i + di, j + dj, k + dk)
                        A.setValueStencil(row, col, -c)
                    barr[k, j, i] = Hx * Hy * Hz
    A.assemble()
    return da, A, b


@pytest.mark.parametrize("grid", [(17, 17, 65), (65, 65, 17)])
def test_ex45_anisotropic_grid_not_worse_than_gamg(grid, tmp_path):
    """ex45 with cells 4x longer in one direction: semi-coarsened
    coefficient levels (11 and 9 iterations; GAMG 16 and 20 on PETSc 3.18,
    12 and 15 on 3.26; the unit flags path took 26 vs GAMG's 19 at
    33x33x129, full coarsening 15 on 17x17x65)."""
    da, A, b = _ex45(*grid)

    class P:
        pass
    p = P()
    p.A, p.b = A, b
    try:
        its = {}
        for name, opts in (("dcdm", DCDM), ("gamg", {"ksp_type": "cg", "pc_type": "gamg"})):
            with make_ksp(A, f"e45{name}_", {**opts, "ksp_rtol": 1e-6,
                                             "ksp_norm_type": "unpreconditioned"}, da=da) as ksp:
                reason, its[name], res, x = solve(ksp, p)
                if name == "dcdm":
                    text = view_text(ksp, tmp_path)
            x.destroy()
            assert reason == "CONVERGED_RTOL" and res <= 1e-6, (name, reason, res)
        assert "coefficients (AIJ)" in text
        assert its["dcdm"] <= its["gamg"], its
    finally:
        for o in (A, b, da):
            o.destroy()


@pytest.mark.parametrize("fam,shape", [(f, (16, 16, 16)) for f in FAMILIES]
                         + [("periodic", (16, 41, 45)), ("periodic", (1, 33, 45)),
                            ("density", (21, 19, 27))])
def test_fused_coefficient_kernels_equal_torch(fam, shape):
    """kernels.c's coefficient passes (mgc_resid, mgc_step, mgc_restrict)
    and the coarse-level energy weight give the torch path's result; also
    where odd periodic axes end in ragged aggregates (3D, and 2D)."""
    import numpy as np
    from deepcd_petsc import kernels, stencil
    if kernels.vcycle_kernels() is None:
        pytest.skip(kernels.status())
    from deepcd_petsc.coefficients import scene_operator
    if shape[0] == 1:      # 2D: the whole-grid stencil, as training builds it
        flags, _, st = scene_operator(fam, shape, 9)
    else:
        p = Problem.from_scene(fam, shape[::-1], seed=9, comm=PETSc.COMM_SELF)     # (z, y, x)
        try:
            st = stencil.from_aij(p.da, p.A, shape)
        finally:
            p.destroy()
        flags = p.flags
    net, _ = load_model()
    s7 = torch.as_tensor(np.concatenate([st.diag[None], st.coef]))
    with torch.inference_mode():
        geo = net.prepare(torch.as_tensor(flags), None, stencil=s7, periodic=st.periodic)
        assert net.kernels_name(geo) == "fused C kernels"
        if shape[-1] % 2:
            # the odd x coarsens, unpadded: the three-cell aggregates run
            assert geo["L"] > 2 and any(f[2] == 2 for f in geo["plan"]), geo["plan"]
            assert geo["pad"] == [0, 0, 0] and geo["levels"][1]["fluid"].shape[-1] == shape[-1] // 2
        r = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
        net.fused = False
        y0 = net(r, geo)
        net.fused = True
        y1 = net(r, geo)
    assert ((y0 - y1).norm() / y0.norm()) < 1e-4


def test_closed_pocket_keeps_the_network_finite():
    """A closed fluid pocket inside one 2x2x2 aggregate coarsens to a zero
    row; it must become inactive, not an infinite D⁻¹ (NaN everywhere)."""
    import numpy as np
    from deepcd_petsc import stencil
    from deepcd_petsc.coefficients import family
    from deepcd_petsc.scenes import SOLID, FLUID
    flags, faces, coef = family("density", (16, 16, 16), 3)
    flags[3:7, 3:6, 3:6] = SOLID
    flags[4:6, 4, 4] = FLUID
    st = stencil.from_coefficients(flags, faces, coef)
    net, _ = load_model()
    s7 = torch.as_tensor(np.concatenate([st.diag[None], st.coef]))
    with torch.inference_mode():
        geo = net.prepare(torch.as_tensor(flags), None, stencil=s7)
        for lv in geo["levels"]:
            assert torch.isfinite(lv["dinv"]).all()
        y = net(torch.randn(1, 1, 16, 16, 16), geo)
    assert torch.isfinite(y).all()


def test_unit_path_only_when_exact(tmp_path):
    """A stack of independent 2D Laplacians (no z couplings) has unit
    couplings, but the flags path would add z couplings: coefficient path."""
    from deepcd_petsc.problem import Problem as P
    p = P.from_scene("box", (8, 8, 8), seed=1, comm=PETSc.COMM_SELF)
    try:
        A = p.A.duplicate(copy=True)
        rows = []
        n = 8
        for k in range(n):
            for j in range(n):
                for i in range(n):
                    r = i + n * (j + n * k)
                    for dk in (-1, 1):
                        if 0 <= k + dk < n:
                            A.setValue(r, r + dk * n * n, 0.0)
                            rows.append(r)
        A.assemble()
        # the diagonal drops the two z faces (Neumann in z)
        d = A.getDiagonal()
        with d as arr:
            z = (np.arange(n ** 3) // (n * n))
            arr[:] -= (z > 0) + (z < n - 1)
        A.setDiagonal(d)
        d.destroy()
        with make_ksp(A, "u2_", {**DCDM, "ksp_rtol": 1e-6, "ksp_max_it": 200}, da=p.da) as ksp:
            x = p.b.duplicate()
            b = p.b.duplicate()
            b.setRandom()
            ksp.solve(b, x)
            text = view_text(ksp, tmp_path)
            x.destroy()
            b.destroy()
        A.destroy()
    finally:
        p.destroy()
    assert "coefficients (AIJ)" in text, text


@pytest.mark.parametrize("seed", [5, 8])
def test_nonmonotone_residual_keeps_the_network(seed, tmp_path):
    """DCDM's ‖r‖ may rise for several steps while the error's energy falls
    (density jumps). The safeguard then compares the network's direction
    with Jacobi's by their energy decrease instead of replacing it: these
    scenes took 217 and 441 iterations when stagnating ‖r‖ alone forced
    Jacobi directions and then the switch to Jacobi-PCG."""
    p = Problem.from_scene("density", (32, 32, 32), seed=seed)
    try:
        gamg = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-6,
                "ksp_norm_type": "unpreconditioned"}
        with make_ksp(p.A, "gm_", gamg, da=p.da) as ksp:
            _, gamg_its, _, x = solve(ksp, p)
        x.destroy()
        # without island deflation, which removes the modes that made ‖r‖ rise
        with make_ksp(p.A, "nm_", {**DCDM, "ksp_rtol": 1e-6, "ksp_max_it": 500,
                                   "ksp_dcdm_deflate": "0"}, da=p.da) as ksp:
            reason, its, res, x = solve(ksp, p)
            ctx = ksp.getPythonContext()
            text = view_text(ksp, tmp_path)
        x.destroy()
    finally:
        p.destroy()
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)
    assert ctx.switched_at is None and ctx.checks >= 1, text
    assert its <= 3 * gamg_its, (its, gamg_its)   # 52 vs 21 and 28 vs 23 here
    assert "check(s)" in text and "lowers the error's energy" in text, text


def test_axis_uniform_levels_read_six_values_and_equal_the_planes(monkeypatch):
    """aniso's levels (one coupling per face direction on a box) store six
    floats instead of six planes, with the planes' result bit for bit; an
    operator with a zero coupling between two active cells (a thin wall)
    or with varying couplings keeps its planes."""
    import numpy as np
    from deepcd_petsc import mgnet
    from deepcd_petsc.coefficients import scene_operator
    net, _ = load_model()
    flags, _, st = scene_operator("aniso", (16, 20, 24), 5)
    s7 = torch.as_tensor(np.concatenate([st.diag[None], st.coef]))
    r = torch.randn(1, 1, 16, 20, 24, generator=torch.Generator().manual_seed(2))
    out = {}
    with torch.inference_mode():
        for mode in ("six", "planes"):
            if mode == "planes":
                monkeypatch.setattr(mgnet, "_axis_uniform", lambda *a, **k: None)
            geo = net.prepare(torch.as_tensor(flags), None, stencil=s7, periodic=st.periodic)
            shapes = [tuple(lv["coef"].shape) for lv in geo["levels"]]
            if mode == "six":
                assert all(s == (1, 6, 1, 1, 1) for s in shapes), shapes
            else:
                assert all(s[-3:] == lv["fluid"].shape[-3:] for s, lv in zip(shapes, geo["levels"]))
            for fused in (True, False):
                net.fused = fused
                out[mode, fused] = net(r, geo)
        net.fused = True
    assert torch.equal(out["six", True], out["planes", True])
    assert torch.equal(out["six", False], out["planes", False])
    # a thin wall: the x couplings across x = 11|12 removed on both sides
    wall = s7.clone()
    wall[6, :, :, 11] = 0
    wall[5, :, :, 12] = 0
    wall[0, :, :, 11:13] -= float(s7[6, 5, 5, 5])     # (their diagonals lose them too)
    sc = torch.zeros(1, 6, 16, 20, 24, dtype=torch.float64)
    with torch.inference_mode():
        monkeypatch.undo()
        geo = net.prepare(torch.as_tensor(flags), None, stencil=wall, periodic=st.periodic)
        assert geo["levels"][0]["coef"].shape[-3:] == (16, 20, 24)
        flags2, _, st2 = scene_operator("density", (16, 16, 16), 5)
        geo = net.prepare(torch.as_tensor(flags2), None,
                          stencil=torch.as_tensor(np.concatenate([st2.diag[None], st2.coef])))
        assert geo["levels"][0]["coef"].shape[-3:] == (16, 16, 16)
    del sc


@pytest.mark.parametrize("shape,periodic", [((1, 12, 9), (False, False, True)),
                                            ((4, 6, 5), (True, False, True)), ((1, 8, 8), None)])
def test_dense_bottom_operator_is_apply_a_on_unit_vectors(shape, periodic):
    """The coarsest level's dense operator, assembled from its coefficients,
    equals _apply_A on every unit vector (active rows and columns) bit for
    bit, periodic axes wrapped."""
    import math
    from deepcd_petsc.mgnet import MGNet, _dense_operator, wrap_pad
    g = torch.Generator().manual_seed(4)
    fl = (torch.rand((1, 1) + shape, generator=g) > 0.25).float()
    lv = {"fluid": fl, "diag": torch.rand((1, 1) + shape, generator=g) * 5 + 1,
          "coef": torch.rand((1, 6) + shape, generator=g)}
    if shape[0] == 1:
        lv["coef"][:, :2] = 0
    n, wrap = math.prod(shape), wrap_pad(periodic)
    f64 = {k: v.double() for k, v in lv.items()}
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *shape)
    keep = fl.reshape(-1) > 0
    ref = MGNet()._apply_A(f64, eye, wrap).reshape(n, n).t()[keep][:, keep]
    assert torch.equal(_dense_operator(lv, keep, wrap), ref)


def test_deflated_bottom_inverse_is_the_pseudo_inverse():
    """The singular coarsest level's inverse by one Cholesky factor with its
    closed regions' constants deflated equals pinv's: two closed regions
    (varying coefficients) and one with a Dirichlet part; None (pinv then)
    where another near-null mode exists."""
    from deepcd_petsc.mgnet import _deflated_inverse
    g = torch.Generator().manual_seed(3)
    n = 30
    a = torch.zeros(n, n, dtype=torch.float64)
    for lo, hi in ((0, 10), (10, 22), (22, 30)):      # three chains
        for i in range(lo, hi - 1):
            c = float(torch.rand(1, generator=g, dtype=torch.float64)) * 100 + 0.01
            a[i, i + 1] = a[i + 1, i] = -c
    a -= torch.diag(a.sum(1))
    a[25, 25] += 3.0                                   # the third has a Dirichlet part
    d = a.diagonal().rsqrt()
    s = d[:, None] * a * d[None, :]
    inv = _deflated_inverse(s, a, d)
    ref = torch.linalg.pinv(s, hermitian=True, rtol=1e-10)
    assert inv is not None and (inv - ref).abs().max() <= 1e-9 * ref.abs().max()
    # a near-null mode that is no region's constant (a weak link of 1e-9
    # between two halves of the first chain): the pivots refuse
    b = a.clone()
    b[4, 5] = b[5, 4] = -1e-9
    b -= torch.diag(b.sum(1))
    db = b.diagonal().rsqrt()
    assert _deflated_inverse(db[:, None] * b * db[None, :], b, db) is None
