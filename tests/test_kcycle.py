"""The K-cycle on coefficient levels (mgnet._kcycle, _kcycle_fused): the
fused C passes equal the torch arithmetic, it saves iterations where the
V-cycle's aggregation loses the smoothest modes, and -ksp_dcdm_kcycle and
-ksp_view say which cycle runs (1 level on 2D grids, none on 3D ones)."""
import pytest
import torch
from petsc4py import PETSc

from deepcd_petsc.errors import SetupError, error_message
from deepcd_petsc.evaluate import TorchSystem, dcdm
from deepcd_petsc.model import default_model_path, dirichlet_fraction, load_model
from test_2d import _laplacian, _laplacian3
from test_ksp import DCDM, make_ksp, view_text


@pytest.fixture(scope="module")
def nets():
    return {d: load_model(default_model_path(d))[0] for d in (2, 3)}


def _apply(net, s, kcycle, fused, dtype=torch.float32):
    net.fused = fused
    try:
        with torch.inference_mode():
            geo = net.prepare(s.flags, dirichlet_fraction(s.flags, s.faces), dtype=dtype,
                              kcycle=kcycle, **s.stencil.network_kw())
            r = (s.b / s.b.norm())[None, None].to(dtype)
            return net(r, geo).double(), geo
    finally:
        net.fused = True


# density: jumps of 1000 (a residual through D⁻¹ and back lost 4% here);
# odd periodic lengths end in three-cell aggregates; aniso's levels are
# axis-uniform (six values, no planes); a 3D family for the 6-face passes
@pytest.mark.parametrize("scene,shape,kcycle", [
    ("density", (66, 50, 1), 1), ("density", (66, 50, 1), 3), ("periodic", (45, 37, 1), 2),
    ("aniso", (64, 48, 1), 1), ("perm", (20, 18, 16), 2)])
def test_fused_kcycle_equals_torch(nets, scene, shape, kcycle):
    s = TorchSystem(scene, shape, 5)
    net = nets[2 if shape[2] == 1 else 3]
    ref, _ = _apply(net, s, kcycle, False, torch.float64)
    torch32, _ = _apply(net, s, kcycle, False)
    fused, geo = _apply(net, s, kcycle, True)
    assert "fused" in geo["levels"][1], "the fused kernels did not run"
    scale = ref.norm()
    assert (torch32 - ref).norm() <= 2e-3 * scale
    assert (fused - ref).norm() <= 2e-3 * scale
    # and it is not the V-cycle
    v, _ = _apply(net, s, 0, True)
    assert (v - fused).norm() > 1e-2 * scale


def test_kcycle_saves_iterations_on_2d_liquid(nets):
    """The V-cycle's piecewise-constant aggregation leaves the smoothest
    modes to the Krylov method; the K-cycle's two coarse steps on the
    finest level resolve them (held-out seeds of the training's scenes)."""
    net = nets[2]
    for seed in (3, 9):
        s = TorchSystem("liquid", (256, 256, 1), seed)
        its = {}
        for k in (0, 1):
            _, geo = _apply(net, s, k, True)
            its[k], hist = dcdm(s, net, geo, maxit=100)
            assert hist[-1] <= 1e-6
        assert its[1] <= its[0] - 2, its


def _da_and_laplacian(dim):
    """A small DMDA and its unit 5- or 7-point operator (test_2d's)."""
    sizes = (24, 20) if dim == 2 else (12, 10, 8)
    da = PETSc.DMDA().create(dim=dim, sizes=sizes, dof=1, stencil_width=1, comm=PETSc.COMM_SELF)
    return da, (_laplacian(da) if dim == 2 else _laplacian3(da))


def _view(dim, opts, tmp_path):
    da, A = _da_and_laplacian(dim)
    prefix = f"kc{dim}{len(opts)}_"
    b, x = A.createVecs()
    try:
        with make_ksp(A, prefix, {**DCDM, "ksp_rtol": "1e-6", **opts}, da) as ksp:
            b.setRandom()
            ksp.solve(b, x)
            assert ksp.getConvergedReason() > 0
            return view_text(ksp, tmp_path)
    finally:
        for o in (b, x, A, da):
            o.destroy()


def test_kcycle_option_and_view(tmp_path):
    text = _view(2, {}, tmp_path)
    assert "coarse corrections: K-cycle on the finest 1 level(s)" in text, text
    assert "(default for 2D grids)" in text and "2 A-orthogonalised" in text, text
    text = _view(2, {"ksp_dcdm_kcycle": "0"}, tmp_path)
    assert "coarse corrections: V-cycle (-kcycle)" in text, text
    # 3D: V-cycle unless asked for
    text = _view(3, {}, tmp_path)
    assert "K-cycle" not in text, text


def test_negative_kcycle_is_one_line():
    da, A = _da_and_laplacian(2)
    try:
        with pytest.raises((SetupError, PETSc.Error)) as e:
            with make_ksp(A, "kn_", {**DCDM, "ksp_dcdm_kcycle": "-1"}, da):
                pass
        assert error_message(e.value) == ("-kn_ksp_dcdm_kcycle must be >= 0 (levels with a "
                                          "K-cycle; 0: V-cycle), got -1")
    finally:
        A.destroy()
        da.destroy()


@pytest.mark.parametrize("case", ["nan", "negative"])
def test_kcycle_bad_input_stops_with_a_reason(case):
    """A NaN in b, or a negative definite operator, on a 2D grid (the
    K-cycle's sums then are NaN or of the wrong sign): a DIVERGED reason in
    few iterations, not a hang or a false convergence."""
    da, A = _da_and_laplacian(2)
    b, x = A.createVecs()
    try:
        b.setRandom()
        if case == "nan":
            b.setValue(5, float("nan"))
            b.assemble()
        else:
            A.scale(-1.0)
        with make_ksp(A, "kb_", {**DCDM, "ksp_max_it": "100"}, da) as ksp:
            ksp.solve(b, x)
            reason, its = ksp.getConvergedReason(), ksp.getIterationNumber()
        assert reason < 0 and its < 100, (reason, its)
        if case == "nan":
            assert reason == PETSc.KSP.ConvergedReason.DIVERGED_NANORINF
    finally:
        for o in (b, x, A, da):
            o.destroy()


def _own(*args, ranks=0):
    """(DCDM's iterations, stdout) of examples/own_operators.py."""
    from helpers import run_own_operators
    rows, out = run_own_operators(*args, ranks=ranks)
    return rows["dcdm"]["its"], out


def test_3d_kcycle_switched_on_where_the_v_cycle_is_slow():
    """A rough log-normal field (no islands, coupling planes): the V-cycle
    is slow, and at iteration 6 the finest level's K-cycle is switched on;
    -ksp_dcdm_kcycle 0 keeps the V-cycle."""
    its, out = _own("--kind", "rough", "--n", 24, "--solvers", "dcdm", "-dcdm_ksp_view")
    assert "K-cycle on the finest 1 level(s)" in out and "switched on at iteration 6" in out, out
    v_its, out = _own("--kind", "rough", "--n", 24, "--solvers", "dcdm", "-dcdm_ksp_view",
                      "-dcdm_ksp_dcdm_kcycle", "0")
    assert "V-cycle (-kcycle)" in out
    assert its < v_its


@pytest.mark.parametrize("args", [("--scene", "perm", "--seed", "1"), ("--scene", "aniso", "--seed", "1"),
                                  ("--scene", "density", "--seed", "1")])
def test_3d_kcycle_stays_off_on_the_families(args):
    """perm converges before the check, aniso has one coupling per axis
    (no planes), density's islands are deflated: all keep the V-cycle."""
    from helpers import run_cli
    r = run_cli(["solve", *args, "--n", "32", "-ksp_type", "python", "-ksp_python_type",
                 "deepcd_petsc.DCDM", "-ksp_rtol", "1e-6", "-ksp_view"])
    assert r.returncode == 0, r.stderr
    assert "coarse corrections: V-cycle (default for 3D grids)" in r.stdout, r.stdout


@pytest.mark.mpi
def test_3d_kcycle_switch_on_ranks_as_in_serial():
    one, _ = _own("--kind", "rough", "--n", 24, "--solvers", "dcdm")
    two, out = _own("--kind", "rough", "--n", 24, "--solvers", "dcdm", "-dcdm_ksp_view", ranks=2)
    assert one == two and "switched on at iteration 6" in out
