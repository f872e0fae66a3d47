"""DCDM as a PETSc KSP (deepcd_petsc.DCDM) and the network as a PC
(deepcd_petsc.NetworkPC), serially: in-process through petsc4py and through
the `deepcd solve` command line."""
import contextlib
import json
import re

import numpy as np
import pytest
from petsc4py import PETSc

from helpers import REPO, ex45_system, run_cli, run_mpi, run_python

from deepcd_petsc.context import geometry_from_operator, set_flags
from deepcd_petsc.errors import SetupError, error_message
from deepcd_petsc.petsc_compat import set_dm_inactive
from deepcd_petsc.model import DCDMNet, default_model_path, dirichlet_fraction, save_checkpoint
from deepcd_petsc.problem import Problem
from deepcd_petsc.solvers import clear_options, reason_name, run_ksp, set_options

Reason = PETSc.KSP.ConvergedReason
DCDM = {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM"}
SCENES = ["box", "smoke", "spheres", "liquid"]
N = 16
CHECK_KSP = REPO / "tests" / "mpi" / "check_ksp.py"


def network_pc(ksp_type):
    return {"ksp_type": ksp_type, "pc_type": "python", "pc_python_type": "deepcd_petsc.NetworkPC"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the network is tiny at these sizes, and several
    threads on a busy machine spin instead of computing."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def problems():
    """Serial Problems by (scene, n), built once per module."""
    cache = {}

    def get(scene, n=N, seed=3):
        key = (scene, n, seed)
        if key not in cache:
            cache[key] = Problem.from_scene(scene, (n, n, n), seed=seed, comm=PETSc.COMM_SELF)
        return cache[key]
    yield get
    for p in cache.values():
        p.destroy()


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A random-weight model of a different (smaller) architecture."""
    import torch
    torch.manual_seed(1234)
    net = DCDMNet(channels=[2, 4, 4])
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_checkpoint(str(path), net, meta={"note": "random weights"})
    return str(path)


@contextlib.contextmanager
def make_ksp(A, prefix, opts, da=None, flags=None):
    """A KSP on A configured by `opts` under `prefix`; the DMDA attached
    (inactive) when given; set_flags only when `flags` = (flags, faces)."""
    set_options(prefix, opts)
    ksp = PETSc.KSP().create(A.getComm())
    try:
        ksp.setOptionsPrefix(prefix)
        ksp.setOperators(A)
        if da is not None:
            ksp.setDM(da)
            set_dm_inactive(ksp)
        ksp.setFromOptions()
        if flags is not None:
            assert set_flags(ksp, *flags) >= 1
        yield ksp
    finally:
        ksp.destroy()
        clear_options(prefix, opts)


def solve(ksp, problem, b=None, x=None):
    """(reason name, iterations, true relative residual, solution Vec)."""
    b = problem.b if b is None else b
    if x is None:
        x = b.duplicate()
        x.set(0.0)
    ksp.solve(b, x)
    r = b.duplicate()
    problem.A.mult(x, r)
    r.aypx(-1.0, b)
    res = r.norm() / b.norm()
    r.destroy()
    return reason_name(ksp.getConvergedReason()), ksp.getIterationNumber(), res, x


def view_text(ksp, tmp_path, name="view.txt"):
    path = tmp_path / name
    v = PETSc.Viewer().createASCII(str(path), comm=ksp.getComm())
    try:
        ksp.view(v)
    finally:
        v.destroy()
    return path.read_text()


def check_converged(res, rtol=1e-6):
    assert res["reason"] == "CONVERGED_RTOL", res
    assert res["true_residual"] <= rtol, res
    assert res["iterations"] > 0, res


# ------------------------------------------------------------------ convergence
@pytest.mark.parametrize("scene", SCENES)
def test_dcdm_converges_every_scene(problems, scene):
    res = run_ksp(problems(scene), "t_", dict(DCDM, ksp_rtol="1e-6", ksp_max_it="2000"))
    check_converged(res)
    assert res["ksp_type"] == "python"


@pytest.mark.parametrize("ksp_type", ["fcg", "gcr", "fgmres"])
@pytest.mark.parametrize("scene", ["spheres", "liquid"])
def test_network_pc_flexible_krylov(problems, scene, ksp_type, capfd):
    res = run_ksp(problems(scene), "t_", dict(network_pc(ksp_type), ksp_rtol="1e-6",
                                              ksp_max_it="2000"))
    check_converged(res)
    assert res["pc_type"] == "python" and res["ksp_type"] == ksp_type
    assert "warning" not in capfd.readouterr().err   # flexible methods: no warning


def test_dcdm_float64_and_random_model(problems, random_model, tmp_path):
    """-ksp_dcdm_model and -ksp_dcdm_dtype are honoured; even a random
    network converges thanks to the safeguard."""
    p = problems("spheres")
    opts = dict(DCDM, ksp_rtol="1e-6", ksp_max_it="2000", ksp_dcdm_model=random_model,
                ksp_dcdm_dtype="float64")
    with make_ksp(p.A, "t_", opts, p.da, (p.flags, p.open_faces)) as ksp:
        reason, its, res, x = solve(ksp, p)
        x.destroy()
        text = view_text(ksp, tmp_path)
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)
    assert random_model in text
    assert "dtype float64" in text and "levels 3" in text, text
    n_params = DCDMNet(channels=[2, 4, 4]).n_params()
    assert f"{n_params} parameters" in text, text


# ------------------------------------------------------------------ tolerances
def test_max_it(problems):
    res = run_ksp(problems("spheres"), "t_", dict(DCDM, ksp_rtol="1e-10", ksp_max_it="3"))
    assert res["reason"] == "DIVERGED_MAX_IT", res
    assert res["iterations"] == 3
    assert res["true_residual"] < 1.0   # three useful steps were taken


def test_loose_rtol(problems):
    tight = run_ksp(problems("smoke"), "t_", dict(DCDM, ksp_rtol="1e-6"))
    res = run_ksp(problems("smoke"), "t_", dict(DCDM, ksp_rtol="1e-2"))
    assert res["reason"] == "CONVERGED_RTOL", res
    assert res["true_residual"] <= 1e-2
    assert 0 < res["iterations"] < tight["iterations"]


def test_large_atol(problems):
    p = problems("spheres")
    bnorm = p.b.norm()
    res = run_ksp(p, "t_", dict(DCDM, ksp_atol=repr(1e3 * bnorm), ksp_rtol="1e-12"))
    assert res["reason"] == "CONVERGED_ATOL", res
    assert res["iterations"] <= 1
    # an atol just below ||b||: stops after a few steps, still with ATOL
    res = run_ksp(p, "t_", dict(DCDM, ksp_atol=repr(0.5 * bnorm), ksp_rtol="1e-12"))
    assert res["reason"] == "CONVERGED_ATOL", res
    assert 1 <= res["iterations"] <= 20
    assert res["true_residual"] <= 0.5 + 1e-12


def test_nonzero_initial_guess(problems):
    p = problems("liquid")
    opts = dict(DCDM, ksp_rtol="1e-6")
    first, ksp, x = run_ksp(p, "t_", opts, keep=True)
    ksp.destroy()
    check_converged(first)
    try:
        # perturb: 1e-5 relative scaling plus tiny noise on the fluid cells
        with x as arr:
            noise = np.random.default_rng(0).standard_normal(arr.shape)
            arr *= 1.0 + 1e-5
            arr += 1e-7 * np.abs(arr).max() * noise * (p.local_flags.ravel() == 0)
        start = p.true_residual(x)
        assert 1e-6 < start < 1e-3, start     # the perturbation matters
        second, ksp, x2 = run_ksp(p, "t_", opts, x0=x, keep=True)
        ksp.destroy()
        x2.destroy()
    finally:
        x.destroy()
    check_converged(second)
    assert second["iterations"] <= first["iterations"] // 2, (first, second)


# ------------------------------------------------------------------ command line
DCDM_CLI = ["-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM"]


def last_json(stdout):
    lines = [l for l in stdout.splitlines() if l.strip()]
    return json.loads(lines[-1])


def test_cli_monitor_reason_view():
    r = run_cli(["solve", "--scene", "liquid", "--n", str(N), "--seed", "2", *DCDM_CLI,
                 "-ksp_rtol", "1e-6", "-ksp_monitor", "-ksp_converged_reason", "-ksp_view",
                 "--json"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    res = last_json(r.stdout)
    check_converged(res)
    its = res["iterations"]
    mon = [re.match(r"^(\s*)(\d+) KSP Residual norm (\S+)\s*$", l) for l in r.stdout.splitlines()]
    mon = [m for m in mon if m]
    assert r.stdout.splitlines().count(mon[0].group(0)) == 1
    assert mon[0].group(0).startswith("  0 KSP Residual norm "), mon[0].group(0)
    assert [int(m.group(2)) for m in mon] == list(range(its + 1))
    norms = [float(m.group(3)) for m in mon]
    assert norms[-1] <= 1e-6 * norms[0] and norms[-2] > 1e-6 * norms[0]
    # PETSc 3.18 prints "Linear  solve" (two spaces) for an empty prefix
    assert re.search(rf"^\s*Linear\s+solve converged due to CONVERGED_RTOL iterations {its}$",
                     r.stdout, re.M), r.stdout
    for text in ["deepcd_petsc.DCDM", default_model_path(), "parameters", "A-orthogonalised",
                 "fallback", "device cpu", "dtype float32", "2 A-orthogonalised",
                 "Krylov vector work: fused C kernels", "overhead (all but",
                 "network inference: fused C kernels"]:
        assert text in r.stdout, f"-ksp_view lacks {text!r}:\n{r.stdout}"
    over = re.search(r"overhead \(all but.*?= ([\d.]+)%; without the A-orthogonalisation and its dot "
                     r".*?= ([\d.]+)%", r.stdout)
    assert over and 0 < float(over[2]) < float(over[1]) < 100, r.stdout


def test_cli_northo():
    r = run_cli(["solve", "--scene", "smoke", "--n", "12", *DCDM_CLI, "-ksp_dcdm_northo", "5",
                 "-ksp_view", "--json"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 A-orthogonalised previous direction(s)" in r.stdout
    check_converged(last_json(r.stdout), rtol=1e-5)   # PETSc's default rtol


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return str(path)


@pytest.mark.parametrize("case", ["missing", "corrupt", "dtype", "device"])
def test_cli_errors(case, tmp_path):
    opts, needle = {
        "missing": (["-ksp_dcdm_model", "/nonexistent.pt"], "/nonexistent.pt"),
        "corrupt": (["-ksp_dcdm_model", _corrupt(tmp_path)], str(tmp_path / "corrupt.pt")),
        "dtype": (["-ksp_dcdm_dtype", "float16"], "float16"),
        "device": (["-ksp_dcdm_device", "tpu"], "tpu"),
    }[case]
    r = run_cli(["solve", "--scene", "spheres", "--n", "12", *DCDM_CLI, *opts])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith("deepcd: error:")]
    assert len(errs) == 1, r.stderr
    assert needle in errs[0], errs[0]
    assert len(lines) == 1, f"more than the one error line on stderr:\n{r.stderr}"
    if case == "corrupt":
        assert "not a deepcd checkpoint" in errs[0], errs[0]


# ------------------------------------------------------------------ options and prefixes
def test_northo_option_in_process(problems, tmp_path):
    p = problems("smoke")
    with make_ksp(p.A, "t_", dict(DCDM, ksp_dcdm_northo="5"), p.da, (p.flags, p.open_faces)) as ksp:
        reason, its, res, x = solve(ksp, p)
        x.destroy()
        text = view_text(ksp, tmp_path)
    assert "5 A-orthogonalised previous direction(s)" in text, text
    assert reason == "CONVERGED_RTOL" and res <= 1e-5


def test_levels_option_caps_the_vcycle(problems, tmp_path, random_model):
    """-ksp_dcdm_levels trades depth for block alignment; fewer levels still
    converge, and the view says how many ran; a U-Net model refuses it."""
    p = problems("spheres", 32)
    its = {}
    for cap in (None, 2):
        opts = dict(DCDM, **({"ksp_dcdm_levels": str(cap)} if cap else {}))
        with make_ksp(p.A, "t_", opts, p.da, (p.flags, p.open_faces)) as ksp:
            reason, its[cap], res, x = solve(ksp, p)
            x.destroy()
            text = view_text(ksp, tmp_path)
            assert reason == "CONVERGED_RTOL" and res <= 1e-5, (cap, reason, res)
            assert f"{cap or 4} levels" in text, text
    assert its[2] > its[None], its
    with pytest.raises((SetupError, PETSc.Error)) as e:
        with make_ksp(p.A, "t_", dict(DCDM, ksp_dcdm_levels="-1"), p.da):
            pass
    assert "levels" in error_message(e.value)
    with pytest.raises((SetupError, PETSc.Error)) as e:
        with make_ksp(p.A, "t_", dict(DCDM, ksp_dcdm_levels="2", ksp_dcdm_model=random_model),
                      p.da, (p.flags, p.open_faces)) as ksp:
            solve(ksp, p)[3].destroy()
    assert "fixed depth" in error_message(e.value)


def test_negative_northo_rejected(problems):
    p = problems("smoke")
    with pytest.raises((SetupError, PETSc.Error)) as e:
        with make_ksp(p.A, "t_", dict(DCDM, ksp_dcdm_northo="-1"), p.da):
            pass
    assert "northo" in error_message(e.value)


def test_inner_prefix(problems, tmp_path):
    p = problems("spheres")
    # an unprefixed option must not reach the inner_ solver
    set_options("", {"ksp_dcdm_northo": "7"})
    try:
        opts = {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM",
                "ksp_dcdm_northo": "3", "ksp_rtol": "1e-6"}
        with make_ksp(p.A, "inner_", opts, p.da, (p.flags, p.open_faces)) as ksp:
            assert ksp.getOptionsPrefix() == "inner_"
            assert ksp.getType() == "python"
            reason, its, res, x = solve(ksp, p)
            x.destroy()
            text = view_text(ksp, tmp_path)
    finally:
        clear_options("", {"ksp_dcdm_northo": "7"})
    assert "3 A-orthogonalised previous direction(s)" in text, text
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)


def test_dcdm_inside_pcksp(problems):
    """DCDM as the inner solver of PCKSP (prefix o_ksp_), outer fgmres."""
    p = problems("smoke")
    opts = {"ksp_type": "fgmres", "ksp_rtol": "1e-6", "pc_type": "ksp",
            "ksp_ksp_type": "python", "ksp_ksp_python_type": "deepcd_petsc.DCDM",
            "ksp_ksp_max_it": "5", "ksp_ksp_rtol": "1e-2",
            "ksp_ksp_dcdm_grid": ",".join(map(str, p.shape))}
    with make_ksp(p.A, "o_", opts, p.da) as ksp:
        ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        reason, its, res, x = solve(ksp, p)
        x.destroy()
        inner = ksp.getPC().getKSP()
        assert inner.getOptionsPrefix() == "o_ksp_"
        assert inner.getType() == "python"
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)


# ------------------------------------------------------------------ set-up errors
def _setup_error(A, opts, da=None, prefix="t_"):
    with pytest.raises((SetupError, PETSc.Error)) as e:
        with make_ksp(A, prefix, opts, da) as ksp:
            ksp.setUp()
    return error_message(e.value)


def test_error_2d_dmda(problems):
    p = problems("spheres")
    da2 = PETSc.DMDA().create(dim=2, sizes=(64, 64), dof=1, comm=PETSc.COMM_SELF)
    try:
        msg = _setup_error(p.A, DCDM, da2)
    finally:
        da2.destroy()
    assert "3D" in msg, msg


def test_error_no_grid(problems):
    msg = _setup_error(problems("spheres").A, DCDM)
    assert "grid" in msg, msg


def test_error_grid_mismatch(problems):
    msg = _setup_error(problems("spheres").A, dict(DCDM, ksp_dcdm_grid="16,16,17"))
    assert "grid mismatch" in msg, msg


def test_error_bad_grid_option(problems):
    msg = _setup_error(problems("spheres").A, dict(DCDM, ksp_dcdm_grid="16"))
    assert "nx,ny,nz" in msg, msg
    # nx,ny is a 2D grid: here one of the wrong size
    msg = _setup_error(problems("spheres").A, dict(DCDM, ksp_dcdm_grid="16,16"))
    assert "grid mismatch" in msg and "16x16x1" in msg, msg


def test_nan_rhs(problems):
    p = problems("spheres")
    b = p.b.copy()
    b.setValue(5, float("nan"))
    b.assemble()
    with make_ksp(p.A, "t_", dict(DCDM, ksp_max_it="50"), p.da, (p.flags, p.open_faces)) as ksp:
        reason, its, _, x = solve(ksp, p, b=b)
        x.destroy()
    b.destroy()
    assert reason == "DIVERGED_NANORINF", (reason, its)
    assert its < 50


@pytest.mark.parametrize("shift", [None, 3.0])
def test_non_spd_operator(problems, shift):
    """-A (negative definite) and A - 3I (indefinite): stops with a
    DIVERGED reason, not a hang and not a false convergence."""
    p = problems("spheres")
    M = p.A.duplicate(copy=True)
    if shift is None:
        M.scale(-1.0)
    else:
        M.shift(-shift)
    try:
        with make_ksp(M, "t_", dict(DCDM, ksp_max_it="200"), p.da, (p.flags, p.open_faces)) as ksp:
            b = p.b
            x = b.duplicate()
            x.set(0.0)
            ksp.solve(b, x)
            reason = reason_name(ksp.getConvergedReason())
            its = ksp.getIterationNumber()
            x.destroy()
    finally:
        M.destroy()
    if shift is None:
        assert reason in ("DIVERGED_INDEFINITE_MAT", "DIVERGED_BREAKDOWN"), (reason, its)
        assert its <= 3, (reason, its)
    else:
        assert reason in ("DIVERGED_INDEFINITE_MAT", "DIVERGED_BREAKDOWN"), (reason, its)
        assert its < 200, (reason, its)


# ------------------------------------------------------------------ geometry without set_flags
@pytest.mark.parametrize("scene", ["spheres", "liquid"])
def test_geometry_derived_from_operator(problems, scene, tmp_path):
    p = problems(scene)
    with make_ksp(p.A, "t_", dict(DCDM, ksp_rtol="1e-6", ksp_max_it="2000"), p.da) as ksp:
        reason, its, res, x = solve(ksp, p)
        x.destroy()
        text = view_text(ksp, tmp_path)
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)
    assert "derived from the operator" in text, text
    assert "DMDA attached" in text, text


def test_geometry_from_grid_option(problems, tmp_path):
    p = problems("smoke")
    opts = dict(DCDM, ksp_rtol="1e-6", ksp_max_it="2000", ksp_dcdm_grid="%d,%d,%d" % p.shape)
    with make_ksp(p.A, "t_", opts) as ksp:
        assert ksp.getDM() is None or ksp.getDM().getType() != PETSc.DM.Type.DA
        reason, its, res, x = solve(ksp, p)
        x.destroy()
        text = view_text(ksp, tmp_path)
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, (reason, its, res)
    assert "derived from the operator" in text and "-grid option" in text, text


@pytest.mark.parametrize("scene", SCENES)
def test_derived_geometry_matches_flags(problems, scene):
    """geometry_from_operator recovers the fluid cells and Dirichlet
    fractions exactly, and follows its documented rule for the rest: a
    non-fluid cell is air iff it neighbours a fluid cell with a Dirichlet
    part. Where that reproduces the true flags, the network sees exactly
    what set_flags gives, so the two evaluations agree bitwise."""
    p = problems(scene)
    local = p.local_flags.shape
    flags, dirichlet = geometry_from_operator(p.da, p.A, local)
    ref = p.local_flags
    dref = dirichlet_fraction(p.flags, p.open_faces)
    assert np.array_equal(flags == 0, ref == 0)
    np.testing.assert_allclose(dirichlet, dref, atol=1e-12)
    wet = np.pad((ref == 0) & (dref > 0), 1)
    near = np.zeros(local, bool)
    for ax in range(3):
        for s in (-1, 1):
            near |= np.roll(wet, s, axis=ax)[1:-1, 1:-1, 1:-1]
    expected = np.where(ref == 0, 0, np.where(near, 2, 1))
    assert np.array_equal(flags, expected)
    assert np.all(flags[(ref == 2) & near] == 2)      # air next to fluid is found
    if scene == "box":
        assert np.array_equal(flags, ref)
    if not np.array_equal(flags, ref):
        return
    outs = []
    for given in (None, (p.flags, p.open_faces)):
        with make_ksp(p.A, "t_", DCDM, p.da, given) as ksp:
            ksp.setUp()
            ev = ksp.getPythonContext().evaluator
            y = p.b.duplicate()
            ev.apply(p.b, y, scale=1.0 / p.b.norm())
            outs.append(y.getArray().copy())
            y.destroy()
    assert np.abs(outs[0]).max() > 0
    assert np.array_equal(outs[0], outs[1])


# ------------------------------------------------------------------ matrix-free operator
@pytest.mark.parametrize("solver", ["dcdm", "gcr", "fgmres"])
def test_petsc_tutorial_ex45(solver, tmp_path):
    """PETSc's own Dirichlet-row Laplacian (no set_flags): the geometry is
    derived from the operator, the decoupled rows are solved by their
    diagonal, and DCDM / the network PC converge in about GAMG's 10
    iterations (CG+Jacobi: ~70)."""
    da, A, b = ex45_system(33)
    opts = dict(DCDM) if solver == "dcdm" else network_pc(solver)
    opts["ksp_rtol"] = "1e-6"
    x = b.duplicate()
    try:
        with make_ksp(A, "t45_", opts, da) as ksp:
            x.set(0.0)
            ksp.solve(b, x)
            reason = reason_name(ksp.getConvergedReason())
            its = ksp.getIterationNumber()
            text = view_text(ksp, tmp_path)
        r = b.duplicate()
        A.mult(x, r)
        r.aypx(-1.0, b)
        res = r.norm() / b.norm()
        r.destroy()
        assert reason == "CONVERGED_RTOL" and its <= 12 and res <= 1e-5, (reason, its, res)
        assert "with Dirichlet rows" in text, text
    finally:
        for o in (x, b, A, da):
            o.destroy()


def test_matrix_free_operator():
    """A Python (shell) Mat whose mult calls A.mult, DMDA attached, no
    set_flags: converges. Run in a subprocess (tests/mpi/check_ksp.py
    shell) so that a crash inside PETSc is a failure, not a dead session."""
    r = run_python([CHECK_KSP, "shell"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK shell ranks=1" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ NetworkPC with plain CG
def test_network_pc_with_cg_warns_once(problems, capfd):
    p = problems("spheres")
    with make_ksp(p.A, "t_", dict(network_pc("cg"), ksp_max_it="10"), p.da,
                  (p.flags, p.open_faces)) as ksp:
        for _ in range(2):
            x = p.b.duplicate()
            x.set(0.0)
            ksp.solve(p.b, x)
            assert ksp.getIterationNumber() > 0
            x.destroy()
    err = capfd.readouterr().err
    warnings = [l for l in err.splitlines() if "warning" in l.lower()]
    assert len(warnings) == 1, err
    assert "fixed SPD preconditioner" in warnings[0] and "'cg'" in warnings[0], err


@pytest.mark.mpi
def test_petsc_tutorial_ex45_same_iterations_on_ranks():
    its = {}
    for p in (1, 3):
        r = run_mpi(p, [REPO / "tests" / "mpi" / "check_ex45.py", "33"])
        assert r.returncode == 0, r.stdout + r.stderr
        line = [l for l in r.stdout.splitlines() if l.startswith("EX45")][-1].split()
        assert int(line[3]) > 0 and float(line[4]) <= 1e-5, line
        its[p] = int(line[2])
    assert its[1] == its[3] and its[1] <= 12, its


# ------------------------------------------------------------------ changing operators
@pytest.mark.parametrize("solver", ["dcdm", "fcg"])
def test_new_operator_rebuilds_the_derived_geometry(problems, solver):
    """Time stepping with moving obstacles: the same KSP gets a new operator
    (KSPSetOperators), then the same Mat assembled anew. With the geometry
    derived from the operator, DCDM and the network PC follow it and take
    the iterations of a fresh KSP on it; the old geometry would be wrong."""
    p1, p2 = problems("spheres", 24, seed=3), problems("liquid", 24, seed=8)
    opts = dict(DCDM) if solver == "dcdm" else network_pc("fcg")
    opts.update(ksp_rtol="1e-6", ksp_norm_type="unpreconditioned")
    with make_ksp(p2.A, "chg_", opts, p2.da) as ksp:
        fresh = solve(ksp, p2)[1]
    with make_ksp(p1.A, "chg_", opts, p1.da) as ksp:
        ctx = (ksp if solver == "dcdm" else ksp.getPC()).getPythonContext()
        solve(ksp, p1)
        first = ctx.evaluator
        solve(ksp, p1)
        assert ctx.evaluator is first                  # same operator: nothing rebuilt
        ksp.setOperators(p2.A)
        reason, its, res, _ = solve(ksp, p2)
        assert ctx.evaluator is not first
        assert reason == "CONVERGED_RTOL" and its == fresh and res <= 1e-6, (its, fresh)
        # the same Mat object, assembled anew with p2's values
        A = p1.A.duplicate(copy=True)
        ksp.setOperators(A)
        solve(ksp, p1)
        second = ctx.evaluator
        p2.A.copy(A)
        reason, its, res, _ = solve(ksp, p2)
        third = ctx.evaluator
        assert third is not second
        assert reason == "CONVERGED_RTOL" and its == fresh, (its, fresh)
        # assembled anew with the same obstacles (values scaled): the
        # network is kept, only the operator's state is noted
        state = A.stateGet()
        A.scale(2.0)
        assert A.stateGet() != state
        reason, its, res, _ = solve(ksp, p2, b=None)
        assert ctx.evaluator is third and ctx.op_state[1] == A.stateGet()
        A.destroy()


def test_monitor_sees_the_current_iterate(problems):
    """x is updated through a torch view: its PETSc state is bumped every
    iteration, so a monitor reading the solution's norm gets the iterate,
    not a cached value."""
    p = problems("smoke")
    opts = dict(DCDM, ksp_rtol="1e-6")
    with make_ksp(p.A, "mon_", opts, p.da, (p.flags, p.open_faces)) as ksp:
        norms = []
        ksp.setMonitor(lambda k, its, rn: norms.append(k.getSolution().norm()))
        _, its, _, x = solve(ksp, p)
        assert norms[0] == 0.0 and len(set(norms[1:])) == its, norms
        assert norms[-1] == pytest.approx(x.norm(), rel=1e-12)
        x.destroy()


def test_jacobi_safeguard_keeps_zero_diagonal_entries():
    """D⁻¹ as VecReciprocal makes it: a zero on the diagonal stays zero
    rather than turning the whole safeguard into the plain residual."""
    from deepcd_petsc.ksp import DCDM as DCDMContext
    from deepcd_petsc.workspace import Workspace
    A = PETSc.Mat().createAIJ((3, 3), nnz=1, comm=PETSc.COMM_SELF)
    for i, v in enumerate((2.0, 0.0, 4.0)):
        A.setValue(i, i, v)
    A.assemble()
    ws = Workspace((3, 3), 1, PETSc.COMM_SELF, 2)
    ctx = DCDMContext()
    ctx.minv = None
    assert ctx._jacobi(A, ws).tolist() == [0.5, 0.0, 0.25]
    ws.destroy()
    A.destroy()


def test_monitor_true_residual_matches():
    """-ksp_monitor_true_residual rebuilds b − A·x from the solution Vec,
    which DCDM updates through a torch view: the true residual equals the
    recursively updated one at every iteration."""
    r = run_cli(["solve", "--scene", "spheres", "--n", "16", "--seed", "2",
                 "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
                 "-ksp_rtol", "1e-8", "-ksp_monitor_true_residual"])
    assert r.returncode == 0, r.stdout + r.stderr
    pairs = [(float(a), float(b)) for a, b in re.findall(
        r"unpreconditioned resid norm (\S+) true resid norm (\S+)", r.stdout)]
    assert len(pairs) >= 5, r.stdout
    for rec, true in pairs:
        assert true == pytest.approx(rec, rel=1e-6, abs=1e-12 * pairs[0][0]), (rec, true)


def test_set_flags_keeps_the_loaded_model(problems):
    """A time-stepping code calls set_flags every step: the network is
    rebuilt for the new flags, the model is not read again; a new dtype
    reloads it."""
    p = problems("spheres")
    with make_ksp(p.A, "keep_", {**DCDM, "ksp_rtol": 1e-6}, da=p.da, flags=(p.flags, p.open_faces)) as ksp:
        ctx = ksp.getPythonContext()
        solve(ksp, p)[3].destroy()
        net, ev = ctx.net, ctx.evaluator
        flags = p.flags.copy()
        flags[0, 0, 0] = 1                      # a new obstacle cell
        set_flags(ksp, flags, p.open_faces)
        reason, its, res, x = solve(ksp, p)
        x.destroy()
        assert ctx.net is net and ctx.evaluator is not ev and ctx.setup_s["model"] < 1e-3
        PETSc.Options("keep_").setValue("ksp_dcdm_dtype", "float64")
        ctx.setFromOptions(ksp)
        set_flags(ksp, p.flags, p.open_faces)
        solve(ksp, p)[3].destroy()
        assert ctx.dtype == "float64", ctx.dtype
        assert ctx.net is not net
        PETSc.Options("keep_").delValue("ksp_dcdm_dtype")
