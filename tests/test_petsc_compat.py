"""What differs between PETSc/petsc4py 3.18 (Debian) and 3.26 (PyPI), checked
on whichever one runs the tests (`make test`, `make test-petsc-latest`):
Vec writes through arrays, null spaces, KSPSetDMActive, errors raised in
the Python contexts, baselines a PETSc build lacks, and no crash at exit
after an error inside a context."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from petsc4py import PETSc

from helpers import HAVE_MPIEXEC, REPO, _env

from deepcd_petsc.errors import SetupError, UserError, error_message, original_error, petsc_errors
from deepcd_petsc.petsc_compat import null_space, pc_type_available, set_dm_inactive
from deepcd_petsc.problem import Problem
from deepcd_petsc.solvers import BASELINES, baseline_unavailable, clear_options, set_options


def test_rhs_norm_sees_the_written_values():
    """b is written through its array; PETSc's norm is that of the values
    (3.26 returned the cached norm of the zeros: "the right-hand side is
    zero on every fluid cell")."""
    p = Problem.from_scene("spheres", (12, 12, 12), seed=3, comm=PETSc.COMM_SELF)
    try:
        b = p.b.getArray(readonly=True)
        assert np.abs(b).max() > 0
        assert p.b.norm() == pytest.approx(np.linalg.norm(b), rel=1e-12)
    finally:
        p.destroy()


def test_with_vec_increases_the_state():
    v = PETSc.Vec().createSeq(5, comm=PETSc.COMM_SELF)
    v.set(1.0)
    assert v.norm() == pytest.approx(5 ** 0.5)     # now cached
    with v as a:
        a[:] = 2.0
    assert v.norm() == pytest.approx(2 * 5 ** 0.5)
    v.getArray()[:] = 3.0
    v.stateIncrease()
    assert v.norm() == pytest.approx(3 * 5 ** 0.5)
    v.destroy()


def test_null_space():
    A = PETSc.Mat().createAIJ((4, 4), nnz=1, comm=PETSc.COMM_SELF)
    for i in range(4):
        A[i, i] = 1.0
    A.assemble()
    assert null_space(A) is None     # petsc4py: an empty handle, not None
    ns = PETSc.NullSpace().create(constant=True, comm=PETSc.COMM_SELF)
    A.setNullSpace(ns)
    got = null_space(A)
    assert got is not None and got.handle == ns.handle
    x = A.createVecRight()
    x.setArray([1.0, 2.0, 3.0, 6.0])
    got.remove(x)
    assert x.sum() == pytest.approx(0.0, abs=1e-12)
    for o in (x, ns, A):
        o.destroy()


def test_set_dm_inactive_solves_with_the_applications_rhs():
    """With the DMDA inactive the KSP solves A x = b with our A and b (an
    active DM would ask it for a right-hand side and fail)."""
    p = Problem.from_scene("smoke", (8, 8, 8), seed=1, comm=PETSc.COMM_SELF)
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    try:
        ksp.setOperators(p.A)
        ksp.setDM(p.da)
        set_dm_inactive(ksp)
        ksp.setType("cg")
        ksp.getPC().setType("jacobi")
        ksp.setTolerances(rtol=1e-8)
        x = p.b.duplicate()
        ksp.solve(p.b, x)
        assert ksp.getConvergedReason() > 0
        assert p.true_residual(x) <= 1e-8
        x.destroy()
    finally:
        ksp.destroy()
        p.destroy()


def test_setup_error_through_petsc():
    """A SetupError raised inside DCDM.setFromOptions: petsc4py 3.18 passes
    it on, 3.23+ wraps it in PETSc.Error (code 101); either way the message
    is found, and petsc_errors turns it into one UserError line."""
    p = Problem.from_scene("smoke", (8, 8, 8), seed=1, comm=PETSc.COMM_SELF)
    opts = {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM", "ksp_dcdm_northo": "-1"}
    set_options("c_", opts)
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    try:
        ksp.setOptionsPrefix("c_")
        ksp.setOperators(p.A)
        with pytest.raises((SetupError, PETSc.Error)) as e:
            ksp.setFromOptions()
        assert isinstance(original_error(e.value), SetupError)
        assert error_message(e.value) == "-c_ksp_dcdm_northo must be >= 0, got -1"
        with pytest.raises(UserError, match=r"^options: -c_ksp_dcdm_northo must be >= 0, got -1$"):
            with petsc_errors("options"):
                ksp.setFromOptions()
        # PETSc's own errors keep PETSc's message
        with pytest.raises(UserError, match="nosuchtype"):
            with petsc_errors("options"):
                ksp.setType("nosuchtype")
    finally:
        ksp.destroy()
        clear_options("c_", opts)
        p.destroy()


def test_baselines_this_build_lacks():
    assert pc_type_available("jacobi") and not pc_type_available("nosuchpc")
    for name in BASELINES:
        why = baseline_unavailable(name)
        assert (why is None) == pc_type_available(BASELINES[name]["pc_type"]), (name, why)
    if not pc_type_available("hypre"):
        assert "hypre" in baseline_unavailable("cg+hypre")


# ---------------------------------------------------------- errors, then exit
SCRIPT = textwrap.dedent('''
    import sys
    import petsc4py
    petsc4py.init(sys.argv[:1])
    from petsc4py import PETSc
    from deepcd_petsc.ksp import DCDM
    from deepcd_petsc.pc import NetworkPC
    from deepcd_petsc.petsc_compat import set_dm_inactive
    from deepcd_petsc.problem import Problem


    class Boom(DCDM):
        def _iterate(self, *args):
            raise RuntimeError("boom inside solve")


    class BoomPC(NetworkPC):
        def apply_network(self, *args, **kw):
            raise RuntimeError("boom inside apply")


    case = sys.argv[1]
    p = Problem.from_scene("spheres", (8, 8, 8), seed=1, comm=PETSc.COMM_SELF)
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    ksp.setOperators(p.A)
    ksp.setDM(p.da)
    set_dm_inactive(ksp)
    if case == "setfromoptions":
        PETSc.Options()["ksp_dcdm_switch"] = "-1"
        ksp.setType("python")
        ksp.setPythonContext(DCDM())
    elif case == "solve":
        ksp.setType("python")
        ksp.setPythonContext(Boom())
    else:
        ksp.setType("fcg")
        ksp.getPC().setType("python")
        ksp.getPC().setPythonContext(BoomPC())
    x = p.b.duplicate()
    kept = []
    try:
        ksp.setFromOptions()
        ksp.solve(p.b, x)
    except Exception as e:
        kept.append(e)       # the exception outlives the KSP, as pytest's does
        print("caught", type(e).__name__, flush=True)
    ksp.destroy()
    x.destroy()
    p.destroy()
    print("end", flush=True)
''')


@pytest.mark.parametrize("case", ["setfromoptions", "solve", "apply"])
def test_error_inside_context_then_clean_exit(tmp_path, case):
    """An exception inside DCDM.setFromOptions, DCDM.solve or NetworkPC.apply,
    kept alive after the KSP is destroyed: the process ends normally (it
    crashed with SEGV at exit under PETSc 3.18: the exception's frames held
    the KSP)."""
    script = tmp_path / "errexit.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True,
                       timeout=300, env=_env(), cwd=REPO)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "caught" in r.stdout and "end" in r.stdout, out
    assert "SEGV" not in out and "Segmentation" not in out, out
    lines = [l for l in r.stderr.splitlines() if l.startswith("deepcd_petsc error: ")]
    want = "switch must be >= 0" if case == "setfromoptions" else "RuntimeError: boom inside"
    assert len(lines) == 1 and want in lines[0], out


LEFT_ALIVE = textwrap.dedent('''
    import sys
    import petsc4py
    petsc4py.init([])
    from petsc4py import PETSc
    import deepcd_petsc
    from deepcd_petsc.petsc_compat import set_dm_inactive
    from deepcd_petsc.problem import Problem
    p = Problem.from_scene("spheres", (12, 12, 12), seed=1)
    ksp = PETSc.KSP().create(p.A.getComm())
    ksp.setOperators(p.A)
    ksp.setDM(p.da)
    set_dm_inactive(ksp)
    ksp.setType("python")
    ksp.setPythonContext(deepcd_petsc.DCDM() if sys.argv[1] == "ksp" else None)
    if sys.argv[1] == "pc":
        ksp.setType("fcg")
        ksp.getPC().setType("python")
        ksp.getPC().setPythonContext(deepcd_petsc.NetworkPC())
    x = p.b.duplicate()
    ksp.solve(p.b, x)
    PETSc.Sys.Print("its", ksp.getIterationNumber())   # rank 0 (mpiexec fails if any rank does)
    # nothing destroyed: the script ends with the solver alive
''')


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("kind", ["ksp", "pc"])
def test_solver_left_alive_at_exit(tmp_path, kind, ranks):
    """A script that never destroys its DCDM KSP or NetworkPC ends
    normally (petsc4py 3.18 destroyed them after the interpreter: SEGV in
    PyThreadState_New; petsc_compat.finalize_before_teardown)."""
    if ranks > 1 and not HAVE_MPIEXEC:
        pytest.skip("mpiexec not found")
    script = tmp_path / "alive.py"
    script.write_text(LEFT_ALIVE)
    cmd = ([sys.executable] if ranks == 1 else
           ["mpiexec", "-n", str(ranks), "--oversubscribe", sys.executable])
    r = subprocess.run(cmd + [str(script), kind], capture_output=True, text=True,
                       timeout=300, env=_env(), cwd=REPO)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert r.stdout.count("its ") == 1, out
    assert "SEGV" not in out and "Segmentation" not in out and "signal" not in out, out
