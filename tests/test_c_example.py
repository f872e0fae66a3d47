"""The C example: built with PETSc's make configuration, run with -python so
PETSc loads deepcd_petsc through petsc4py, serially and under mpiexec."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CDIR = os.path.join(ROOT, "examples", "c")
PETSC_CONF = "/usr/lib/petsc/lib/petsc/conf/variables"

pytestmark = pytest.mark.skipif(not (os.path.exists(PETSC_CONF) and shutil.which("mpicc")),
                                reason="PETSc development files (petsc-dev) not installed")


def env():
    e = dict(os.environ)
    # -python makes PETSc run the first python3 on PATH to find libpython
    # and sys.path: that must be the environment holding torch/deepcd_petsc
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_rmaps_base_oversubscribe="1")
    return e


@pytest.fixture(scope="module")
def exe():
    r = subprocess.run(["make", "-s", "poisson3d"], cwd=CDIR, capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stdout + r.stderr
    path = os.path.join(CDIR, "poisson3d")
    assert os.access(path, os.X_OK)
    return path


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)


def parse(out):
    m = re.search(r"iterations (\d+), reason (\w+), true residual ([0-9.e+-]+)", out)
    assert m, out
    return int(m.group(1)), m.group(2), float(m.group(3))


DCDM = ["-python", "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
        "-ksp_dcdm_threads", "1"]


def test_classical(exe):
    its, reason, res = parse(run([exe, "-n", "16", "-sphere", "-pc_type", "gamg", "-ksp_rtol", "1e-6"]).stdout)
    assert reason == "CONVERGED_RTOL" and res <= 1e-6


@pytest.mark.parametrize("extra", [[], ["-sphere"]])
def test_dcdm_serial(exe, extra):
    r = run([exe, "-n", "20", *extra, *DCDM, "-ksp_rtol", "1e-6", "-ksp_view"])
    its, reason, res = parse(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert reason == "CONVERGED_RTOL" and res <= 1e-6
    assert "deepcd_petsc.DCDM" in r.stdout and "derived from the operator" in r.stdout


def test_network_pc_fcg(exe):
    r = run([exe, "-n", "16", "-python", "-ksp_type", "fcg", "-pc_type", "python",
             "-pc_python_type", "deepcd_petsc.NetworkPC", "-pc_dcdm_threads", "1", "-ksp_rtol", "1e-6"])
    its, reason, res = parse(r.stdout)
    assert reason == "CONVERGED_RTOL" and res <= 1e-6, r.stdout + r.stderr


@pytest.mark.mpi
def test_dcdm_mpi_same_iterations(exe):
    if not shutil.which("mpiexec"):
        pytest.skip("mpiexec not found")
    serial = parse(run([exe, "-n", "20", "-sphere", *DCDM, "-ksp_rtol", "1e-6"]).stdout)
    r = run(["mpiexec", "-n", "2", exe, "-n", "20", "-sphere", *DCDM, "-ksp_rtol", "1e-6"])
    par = parse(r.stdout)
    assert par[1] == "CONVERGED_RTOL" and par[2] <= 1e-6, r.stdout + r.stderr
    assert abs(par[0] - serial[0]) <= 1, (serial, par)


def test_bad_model_is_named(exe):
    r = run([exe, "-n", "8", *DCDM, "-ksp_dcdm_model", "/no/such/model.pt"])
    assert r.returncode != 0
    assert "deepcd_petsc error" in r.stderr and "/no/such/model.pt" in r.stderr
