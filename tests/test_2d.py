"""DCDM and the network PC on 2D DMDAs (5-point operators): the flat 3D
DMDA that carries a 2D one (same numbering), solves serially and under
mpiexec on odd, non-square grids (the network's output and the iteration
count equal to the serial ones), periodic axes, probed matrix-free
operators, and one-line errors for what the network cannot read."""
import numpy as np
import pytest
from petsc4py import PETSc

from helpers import REPO, run_mpi, run_python

from deepcd_petsc.context import flat_dmda
from deepcd_petsc.errors import SetupError, error_message
from deepcd_petsc.petsc_compat import set_dm_inactive

CHECK_2D = REPO / "tests" / "mpi" / "check_2d.py"
BT = PETSc.DM.BoundaryType


def test_flat_dmda_numbers_cells_as_the_2d_one():
    """Cell (i, j) has the same PETSc index in the 2D DMDA and its flat
    3D one, for an uneven split chosen by hand (one process here: the
    ownership ranges are what matters, tested under MPI below)."""
    da = PETSc.DMDA().create(dim=2, sizes=(13, 7), dof=1, stencil_width=1,
                             boundary_type=(BT.PERIODIC, BT.MIRROR),
                             stencil_type=PETSc.DMDA.StencilType.STAR, comm=PETSc.COMM_SELF)
    flat = flat_dmda(da)
    try:
        assert flat.getDim() == 3 and flat.getSizes() == (13, 7, 1)
        assert flat.getRanges()[:2] == da.getRanges()
        assert flat.getBoundaryType() == (BT.PERIODIC, BT.NONE, BT.NONE)
        a2, a3 = da.getAO(), flat.getAO()
        nat = np.arange(13 * 7, dtype=PETSc.IntType)
        assert np.array_equal(a2.app2petsc(nat.copy()), a3.app2petsc(nat.copy()))
    finally:
        flat.destroy()
        da.destroy()


def _run(p, nx, ny, out, *opts):
    args = [CHECK_2D, nx, ny, out, *opts]
    r = run_python(args, timeout=240) if p == 1 else run_mpi(p, args, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return dict(np.load(out))


def test_flat_view_answers_as_the_flat_dmda():
    """The set-up's FlatView gives the flat DMDA's sizes, ranges, splits and
    boundary types without creating it, and creates it for anything else;
    _ghosted pads one process's flags as scenes.padded does (periodic
    axes wrapped, open faces AIR) without a ghost exchange."""
    from deepcd_petsc.context import _ghosted
    from deepcd_petsc.layout import FlatView
    from deepcd_petsc.scenes import padded
    da = PETSc.DMDA().create(dim=2, sizes=(13, 7), dof=1, stencil_width=1,
                             boundary_type=(BT.PERIODIC, BT.MIRROR),
                             stencil_type=PETSc.DMDA.StencilType.STAR, comm=PETSc.COMM_SELF)
    flat, view = flat_dmda(da), FlatView(da)
    try:
        for m in ("getSizes", "getProcSizes", "getRanges", "getCorners", "getBoundaryType",
                  "getDimension"):
            assert getattr(view, m)() == getattr(flat, m)(), m
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in
                   zip(view.getOwnershipRanges(), flat.getOwnershipRanges()))
        assert view._da is None and view.getGhostCorners() == flat.getGhostCorners()
        flags = np.random.default_rng(0).integers(0, 3, (1, 7, 13)).astype(np.int8)
        for faces in ((), ("y+", "x-")):
            assert np.array_equal(_ghosted(view, flags, faces),
                                  padded(flags, faces, (False, False, True)))
    finally:
        view.destroy()
        flat.destroy()
        da.destroy()


# (grid, options, rank counts): odd and non-square grids; odd periodic
# axes end in ragged aggregates (45, 37, 35); 40 = 8·5 is divided exactly
CASES = [
    ((45, 37), ("--jump",), (2, 3, 4, 6)),
    ((40, 37), ("--periodic", "x"), (6,)),
    ((45, 37), ("--periodic", "xy", "--jump"), (2, 3, 4)),
    ((77, 36), ("--periodic", "x"), (2, 6)),
    ((32, 24), ("--periodic", "xy", "--jump"), (4,)),
    ((45, 35), ("--shell", "--periodic", "y"), (3,)),
    ((33, 50), ("--pc",), (3,)),
]


@pytest.mark.parametrize("grid,opts,ranks", CASES, ids=lambda c: "-".join(map(str, c))
                         if isinstance(c, tuple) else str(c))
def test_2d_distributed_equals_serial(grid, opts, ranks, tmp_path):
    """The network's output f(b) on P ranks equals the serial one to
    float32 rounding (in practice bit for bit), with the same iteration
    count and a converged true residual."""
    ref = _run(1, *grid, tmp_path / "serial.npz", *opts)
    assert int(ref["reason"]) > 0 and float(ref["true_residual"]) <= 1e-6, ref
    assert "5-point" in str(ref["path"]) and "2D DMDA" in str(ref["grid"]), ref
    if "--shell" in opts:
        assert "probed, 6 MatMults" in str(ref["path"])
    scale = np.abs(ref["fb"]).max()
    for p in ranks:
        got = _run(p, *grid, tmp_path / f"np{p}.npz", *opts)
        assert int(got["iterations"]) == int(ref["iterations"]), (p, got, ref)
        assert np.abs(got["fb"] - ref["fb"]).max() <= 1e-6 * scale, p
        assert float(got["true_residual"]) <= 1e-6, (p, got)


def test_2d_few_iterations(tmp_path):
    """On a plain 2D Poisson problem the shipped (3D-trained) network needs
    few iterations (CG + Jacobi: ~150 here)."""
    ref = _run(1, 96, 80, tmp_path / "s.npz")
    assert int(ref["iterations"]) <= 9, ref


# -- errors -------------------------------------------------------------------
def _ksp(da, A):
    import deepcd_petsc
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    ksp.setOperators(A)
    ksp.setDM(da)
    set_dm_inactive(ksp)
    ksp.setType("python")
    ksp.setPythonContext(deepcd_petsc.DCDM())
    return ksp


def _error(da, A):
    ksp = _ksp(da, A)
    b = A.createVecLeft()
    b.set(1.0)
    x = b.duplicate()
    try:
        with pytest.raises((SetupError, PETSc.Error)) as e:
            ksp.solve(b, x)
        return error_message(e.value)
    finally:
        ksp.destroy()
        b.destroy()
        x.destroy()


def _laplacian(da, nine=False):
    A = da.createMat()
    A.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, False)
    nx, ny = da.getSizes()[:2]
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    offs = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(1, 1)] if nine else [])
    for j in range(ny):
        for i in range(nx):
            row.index = col.index = (i, j)
            A.setValueStencil(row, col, 4.0)
            for di, dj in offs:
                if 0 <= i + di < nx and 0 <= j + dj < ny:
                    col.index = (i + di, j + dj)
                    A.setValueStencil(row, col, -0.5 if (di and dj) else -1.0)
    A.assemble()
    return A


def test_2d_dof2_is_one_line():
    da = PETSc.DMDA().create(dim=2, sizes=(8, 8), dof=2, stencil_width=1, comm=PETSc.COMM_SELF)
    A = da.createMat()
    A.shift(1.0)
    try:
        msg = _error(da, A)
        assert "2D or 3D DMDA with dof 1" in msg and "dof 2" in msg, msg
    finally:
        A.destroy()
        da.destroy()


def test_9_point_2d_operator_is_one_line():
    da = PETSc.DMDA().create(dim=2, sizes=(9, 7), dof=1, stencil_width=1,
                             stencil_type=PETSc.DMDA.StencilType.BOX, comm=PETSc.COMM_SELF)
    A = _laplacian(da, nine=True)
    try:
        msg = _error(da, A)
        assert "not a 5-point stencil on the 2D DMDA" in msg and "\n" not in msg, msg
    finally:
        A.destroy()
        da.destroy()


def test_2d_grid_option_without_dmda():
    """-ksp_dcdm_grid nx,ny: a 2D grid without a DMDA attached."""
    import deepcd_petsc
    da = PETSc.DMDA().create(dim=2, sizes=(24, 20), dof=1, stencil_width=1, comm=PETSc.COMM_SELF)
    A = _laplacian(da)
    b, x = A.createVecLeft(), A.createVecRight()
    opts = PETSc.Options()
    opts["g2_ksp_dcdm_grid"] = "24,20"
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    try:
        ksp.setOperators(A)
        ksp.setOptionsPrefix("g2_")
        ksp.setType("python")
        ksp.setPythonContext(deepcd_petsc.DCDM())
        ksp.setTolerances(rtol=1e-6)
        ksp.setFromOptions()
        b.set(1.0)
        x.set(0.0)
        ksp.solve(b, x)
        assert ksp.getConvergedReason() > 0 and ksp.getIterationNumber() <= 8
        assert ksp.getPythonContext().evaluator.shape == (24, 20, 1)
    finally:
        del opts["g2_ksp_dcdm_grid"]
        ksp.destroy()
        for o in (A, b, x, da):
            o.destroy()


# -- the command line -----------------------------------------------------------
DCDM_OPTS = ["-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM", "-ksp_rtol", "1e-6"]


def _json(r):
    import json
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scene", ["spheres", "liquid", "periodic"])
def test_cli_solve_dim2(scene):
    """deepcd solve --dim 2: the 2D scenes on a 2D DMDA, few iterations."""
    from helpers import run_cli
    out = _json(run_cli(["solve", "--dim", "2", "--n", "64", "--scene", scene, "--json", *DCDM_OPTS]))
    assert out["reason"] == "CONVERGED_RTOL" and out["true_residual"] <= 1e-6, out
    assert out["iterations"] <= 12, out


def test_cli_solve_shape2_distributed_same_iterations():
    """--shape NX,NY is a 2D grid; 3 ranks take the serial iteration count."""
    from helpers import run_cli, run_cli_mpi
    args = ["solve", "--shape", "45,38", "--scene", "smoke", "--json", *DCDM_OPTS]
    one, three = _json(run_cli(args)), _json(run_cli_mpi(3, args))
    assert one["iterations"] == three["iterations"] and three["ranks"] == 3, (one, three)


def test_cli_bench_dim2(tmp_path):
    from helpers import run_cli
    r = run_cli(["bench", "--dim", "2", "--sizes", "32", "--scenes", "spheres", "--solvers", "dcdm,cg",
                 "--repeats", "1", "--out", tmp_path])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "32^2 dcdm" in r.stdout and "CONVERGED_RTOL" in r.stdout, r.stdout


def test_cli_bench_kcycle(tmp_path):
    """bench --kcycle reaches DCDM and the network PC (the V-cycle takes
    more iterations on this 2D liquid scene), and a negative one is a
    one-line error."""
    import json
    from helpers import run_cli
    from test_evaluate_cli import assert_one_line_error
    its = {}
    for k in ("0", "1"):
        out = tmp_path / k
        r = run_cli(["bench", "--dim", "2", "--sizes", "256", "--scenes", "liquid", "--seed", "3",
                     "--solvers", "dcdm,fcg+net", "--repeats", "1", "--kcycle", k, "--out", out])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        rows = json.loads((out / "bench.json").read_text())["results"]
        its[k] = {row["solver"]: row["iterations"] for row in rows}
    for solver in ("dcdm", "fcg+net"):
        assert its["1"][solver] < its["0"][solver], its
    assert_one_line_error(run_cli(["bench", "--kcycle", "-1"]), "--kcycle")


def test_capped_hierarchy_solves_its_bottom_exactly():
    """A coefficient hierarchy stopped above DENSE_CELLS by the level cap
    (4096² in 2D bottoms out at 64²; here -ksp_dcdm_levels 2 at 128²)
    solves its 4096-cell coarsest level by its inverse: 5 iterations, 32
    with 16 smoothing steps there (66 against 9 at 4096²)."""
    from helpers import run_cli
    r = run_cli(["solve", "--dim", "2", "--scene", "spheres", "--n", "128", "--seed", "1",
                 "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
                 "-ksp_dcdm_levels", "2", "--json"])
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["iterations"] <= 8, res


# -- the shipped 2D model ---------------------------------------------------------
def _ksp_on(da, A, prefix, **opts):
    import deepcd_petsc
    o = PETSc.Options()
    for k, v in opts.items():
        o[prefix + k] = v
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    ksp.setOperators(A)
    ksp.setOptionsPrefix(prefix)
    ksp.setType("python")
    ksp.setPythonContext(deepcd_petsc.DCDM())
    ksp.setDM(da)
    set_dm_inactive(ksp)
    ksp.setFromOptions()
    for k in opts:
        del o[prefix + k]
    return ksp


def test_the_grid_dimension_picks_the_shipped_model(tmp_path):
    """Without -model a 2D DMDA gets default2d.pt and a 3D one default.pt
    (-ksp_view says which); -model overrides it for both."""
    from deepcd_petsc.model import default_model_path
    cases = [(PETSc.DMDA().create(dim=2, sizes=(24, 20), dof=1, stencil_width=1, comm=PETSc.COMM_SELF), 2),
             (PETSc.DMDA().create(dim=3, sizes=(12, 10, 8), dof=1, stencil_width=1, comm=PETSc.COMM_SELF), 3)]
    for da, dim in cases:
        A = _laplacian(da) if dim == 2 else _laplacian3(da)
        for prefix, opts, want in [(f"m{dim}a_", {}, default_model_path(dim)),
                                   (f"m{dim}b_", {"ksp_dcdm_model": default_model_path(5 - dim)},
                                    default_model_path(5 - dim))]:
            ksp = _ksp_on(da, A, prefix, **opts)
            try:
                ksp.setUp()
                ctx = ksp.getPythonContext()
                assert ctx.loaded_path == want, (dim, opts)
                view = tmp_path / f"{prefix}view.txt"
                v = PETSc.Viewer().createASCII(str(view), comm=PETSc.COMM_SELF)
                ksp.view(v)
                v.destroy()
                text = view.read_text()
                assert f"model: {want}" in text and ("(shipped default)" in text) == (not opts), text
            finally:
                ksp.destroy()
        A.destroy()
        da.destroy()
    assert default_model_path(2) != default_model_path(3)


def _laplacian3(da):
    """The unit 7-point operator on a 3D DMDA (Dirichlet beyond the grid)."""
    A = da.createMat()
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    nx, ny, nz = da.getSizes()
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    for k in range(zs, ze):
        for j in range(ys, ye):
            for i in range(xs, xe):
                row.index = (i, j, k)
                A.setValueStencil(row, row, 6.0)
                for di, dj, dk in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
                    if 0 <= i + di < nx and 0 <= j + dj < ny and 0 <= k + dk < nz:
                        col.index = (i + di, j + dj, k + dk)
                        A.setValueStencil(row, col, -1.0)
    A.assemble()
    return A


def test_shipped_2d_model_is_flags_pt_fine_tuned():
    """default2d.pt: the same architecture (same kernels, same checks) as
    default.pt, trained on 2D data from flags.pt (default.pt's start), with
    its card; on held-out 2D scenes it takes fewer iterations than its
    start, and no more than the family-trained 3D model (torch evaluation)."""
    import torch
    from deepcd_petsc.evaluate import evaluate
    from deepcd_petsc.model import default_model_path, load_model
    n3, c3 = load_model(default_model_path(3))
    n2, c2 = load_model(default_model_path(2))
    assert c2["config"] == c3["config"]
    assert c2["meta"]["n2d"] and not c2["meta"]["n"]
    assert c2["meta"]["init"].endswith("flags.pt")
    assert c3["meta"]["init"].endswith("flags.pt") and "density" in c3["meta"]["scenes"]
    card = (REPO / "deepcd_petsc" / "models" / "MODEL_CARD_2D.md").read_text()
    assert "--n2d" in card and "default2d.pt" in card
    torch.set_num_threads(1)
    nf, _ = load_model(REPO / "deepcd_petsc" / "models" / "flags.pt")
    its = {}
    for name, net in (("flags", nf), ("3d", n3), ("2d", n2)):
        rows = evaluate(net, ["spheres", "liquid", "density"], [96], [5, 6], baselines=False, dim=2)
        assert all(isinstance(r["dcdm"], int) for r in rows), rows
        its[name] = sum(r["dcdm"] for r in rows)
    assert its["2d"] < its["flags"] and its["2d"] <= its["3d"], its
