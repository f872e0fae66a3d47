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


def petsc_config():
    """PETSC_DIR and PETSC_ARCH of the PETSc that this petsc4py runs on
    (Debian's 3.18, or the pip-built one of tools/petsc_latest.sh): the C
    program must link the same PETSc that -python loads petsc4py for."""
    import petsc4py
    conf = petsc4py.get_config()
    return conf["PETSC_DIR"], conf.get("PETSC_ARCH") or ""


PETSC_DIR, PETSC_ARCH = petsc_config()
PETSC_CONF = os.path.join(PETSC_DIR, PETSC_ARCH, "lib", "petsc", "conf", "variables")

pytestmark = pytest.mark.skipif(not (os.path.exists(PETSC_CONF) and shutil.which("mpicc")),
                                reason=f"PETSc development files not found ({PETSC_CONF}; "
                                       "Debian: petsc-dev)")


def env():
    e = dict(os.environ)
    # -python makes PETSc run the first python3 on PATH to find libpython
    # and sys.path: that must be the environment holding torch/deepcd_petsc
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_rmaps_base_oversubscribe="1")
    e.pop("PETSC_OPTIONS", None)
    # a pip-built PETSc is relocatable: -python finds petsc4py through
    # ${PETSC_DIR}, which must then be set ("Substitution string ${PETSC_DIR}
    # not found"); harmless for Debian's
    e.update(PETSC_DIR=PETSC_DIR, PETSC_ARCH=PETSC_ARCH)
    return e


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    """examples/c/poisson3d built with that PETSc's make configuration, in
    a fresh directory (a binary left from another PETSc is never reused)."""
    d = tmp_path_factory.mktemp("poisson3d")
    for f in ("poisson3d.c", "makefile"):
        shutil.copy(os.path.join(CDIR, f), d / f)
    r = subprocess.run(["make", "-s", "poisson3d", f"PETSC_DIR={PETSC_DIR}", f"PETSC_ARCH={PETSC_ARCH}"],
                       cwd=d, capture_output=True, text=True, env=env())
    path = str(d / "poisson3d")
    assert r.returncode == 0 and os.access(path, os.X_OK), r.stdout + r.stderr
    return path


def test_links_the_running_petsc(exe):
    """The binary reports the PETSc version petsc4py runs on."""
    from petsc4py import PETSc
    r = run([exe, "-n", "8", "-version"])
    want = "Release Version %d.%d.%d" % PETSc.Sys.getVersion()
    assert want in r.stdout + r.stderr, r.stdout + r.stderr


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


BOOM = '''
from deepcd_petsc.ksp import DCDM
from deepcd_petsc.pc import NetworkPC


class Boom(DCDM):
    def _iterate(self, *args):
        raise RuntimeError("boom inside DCDM's solve")


class BoomPC(NetworkPC):
    def apply_network(self, *args, **kw):
        raise RuntimeError("boom inside NetworkPC's apply")
'''


@pytest.mark.parametrize("kind", ["ksp", "pc"])
def test_unexpected_error_is_named(exe, tmp_path, kind):
    """A Python exception that is no SetupError (a bug) inside the KSP's
    solve or the PC's apply: PETSc shows only an error code, the context
    names the exception in one line first; no crash at exit."""
    (tmp_path / "boom.py").write_text(BOOM)
    args = (["-ksp_type", "python", "-ksp_python_type", "boom.Boom"] if kind == "ksp" else
            ["-ksp_type", "fcg", "-pc_type", "python", "-pc_python_type", "boom.BoomPC"])
    e = env()
    e["PYTHONPATH"] = str(tmp_path) + os.pathsep + e["PYTHONPATH"]
    r = subprocess.run([exe, "-n", "8", "-python", *args], capture_output=True, text=True,
                       env=e, timeout=300)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if "deepcd_petsc error" in l]
    assert len(lines) == 1, r.stderr
    assert "RuntimeError: boom inside" in lines[0], r.stderr
    assert "SEGV" not in r.stderr, r.stderr
