"""The fused C vector kernels (kernels.c) against torch, their fallback,
and DCDM's work vectors (workspace.py) with and without them."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from petsc4py import PETSc

from helpers import REPO, _env

from deepcd_petsc import kernels
from deepcd_petsc.kernels import pointers
from deepcd_petsc.problem import Problem
from deepcd_petsc.solvers import run_ksp
from deepcd_petsc.workspace import Workspace

N = 100_003   # not a multiple of the kernels' block or of any thread split


@pytest.fixture(scope="module")
def lib():
    lib = kernels.load()
    assert lib is not None, kernels.status()   # this machine has a C compiler
    return lib


@pytest.fixture
def vecs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(10, N, dtype=torch.float64, generator=g)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * N)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dots(lib, vecs, threads):
    a, bs = vecs[0], [vecs[1], vecs[2], vecs[0]]
    out = (ctypes.c_double * 3)()
    assert lib.deepcd_dots(N, a.data_ptr(), 3, pointers(bs), out, threads) == 0
    close(list(out), [torch.dot(a, b).item() for b in bs])
    again = (ctypes.c_double * 3)()
    lib.deepcd_dots(N, a.data_ptr(), 3, pointers(bs), again, threads)
    assert list(out) == list(again)   # fixed-order partial sums: reproducible


def test_dots_refuses_too_many_vectors(lib, vecs):
    out = (ctypes.c_double * 17)()
    assert lib.deepcd_dots(N, vecs[0].data_ptr(), 17, pointers([vecs[1]] * 17), out, 1) == -1


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_orth_update(lib, vecs, k):
    ps, qs = list(vecs[1:1 + k]), list(vecs[4:4 + k])
    c = [0.3, -1.7, 2.5][:k]
    d, q, r = vecs[7].clone(), vecs[8].clone(), vecs[9]
    dref, qref = d.clone(), q.clone()
    for cj, p, pq in zip(c, ps, qs):
        dref -= cj * p
        qref -= cj * pq
    out = (ctypes.c_double * 2)()
    lib.deepcd_orth_update(N, k, (ctypes.c_double * max(k, 1))(*c), pointers(ps), pointers(qs),
                           d.data_ptr(), q.data_ptr(), r.data_ptr(), out, 2)
    close(d, dref)
    close(q, qref)
    close(list(out), [torch.dot(dref, r).item(), torch.dot(dref, qref).item()])


def test_step(lib, vecs):
    x, d, r, q = vecs[0].clone(), vecs[1], vecs[2].clone(), vecs[3]
    xref, rref = x + 0.7 * d, r - 0.7 * q
    out = (ctypes.c_double * 1)()
    lib.deepcd_step(N, 0.7, x.data_ptr(), d.data_ptr(), r.data_ptr(), q.data_ptr(), out, 2)
    close(x, xref)
    close(r, rref)
    close(out[0], torch.dot(rref, rref).item())


def test_workspace_kernels_equal_torch_path(lib):
    """The same Workspace operations through the kernels and through torch."""
    results = []
    for use in (lib, None):
        ws = Workspace((N, N), 1, PETSc.COMM_SELF, 8)
        ws.lib = use
        g = torch.Generator().manual_seed(2)
        ws.buf.copy_(torch.randn(ws.buf.shape, dtype=torch.float64, generator=g))
        x = torch.zeros(N, dtype=torch.float64)
        r, d, q, p1, q1, p2, q2 = ws.rows[1:]
        c = ws.dots(q, [p1, p2])
        dr, dq = ws.orthogonalise([c[0] / 3.0, c[1] / 5.0], [p1, p2], [q1, q2], d, q, r)
        rn = ws.step(dr / dq, x, d, r, q)
        results.append((c, dr, dq, rn, x.clone(), r.clone(), ws.norm(p1)))
        ws.destroy()
    for a, b in zip(*results):
        close(np.asarray(a), np.asarray(b))


def test_workspace_vecs_share_memory():
    """The PETSc Vecs are the tensor rows: MatMult output appears in the row."""
    ws = Workspace((5, 5), 1, PETSc.COMM_SELF, 2)
    ws.vecs[0].set(2.0)
    assert torch.all(ws.rows[0] == 2.0)
    ws.rows[1].fill_(3.0)
    ws.vecs[1].stateIncrease()
    assert ws.vecs[1].norm() == pytest.approx(3.0 * 5 ** 0.5)
    ws.destroy()


def test_one_openmp_runtime(lib):
    """The kernels bind to the libgomp torch loaded, not a second runtime."""
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp


def _python(code, **env):
    e = _env()
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=e, cwd=REPO, timeout=300)


SOLVE = """
from deepcd_petsc import kernels
from deepcd_petsc.problem import Problem
from deepcd_petsc.solvers import run_ksp
p = Problem.from_scene("spheres", (16, 16, 16), seed=3)
res = run_ksp(p, options={"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM",
                          "ksp_rtol": "1e-6"})
print(kernels.status())
print(res["reason"], res["iterations"], res["true_residual"])
p.destroy()
"""


def test_no_compiler_falls_back_to_torch(tmp_path):
    r = _python(SOLVE, CC="/nonexistent/cc", DEEPCD_KERNEL_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    status, result = r.stdout.strip().splitlines()[-2:]
    assert status.startswith("torch (C kernels unavailable: no C compiler"), status
    assert result.startswith("CONVERGED_RTOL"), result


def test_kernels_off_by_environment_and_same_iterations(tmp_path):
    on = _python(SOLVE, DEEPCD_KERNEL_DIR=str(tmp_path))
    off = _python(SOLVE, DEEPCD_KERNELS="0")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    s_on, r_on = on.stdout.strip().splitlines()[-2:]
    s_off, r_off = off.stdout.strip().splitlines()[-2:]
    assert s_on.startswith("fused C kernels") and str(tmp_path) in s_on, s_on
    assert s_off == "torch (DEEPCD_KERNELS=0)"
    assert r_on.split()[:2] == r_off.split()[:2]          # same reason and iterations
    assert list(tmp_path.glob("deepcd_kernels-*.so"))      # built into the given cache


def test_dcdm_same_result_with_and_without_kernels():
    p = Problem.from_scene("smoke", (16, 16, 16), seed=4, comm=PETSc.COMM_SELF)
    opts = {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM", "ksp_rtol": "1e-8"}
    try:
        res, ksp, x = run_ksp(p, "kern_", opts, keep=True)
        ctx = ksp.getPythonContext()
        assert ctx.ws.lib is not None
        x1 = x.getArray().copy()
        ctx.ws.lib = None
        ksp.solve(p.b, x)
        assert ksp.getIterationNumber() == res["iterations"]
        np.testing.assert_allclose(x.getArray(), x1, rtol=0, atol=1e-9 * np.abs(x1).max())
        ksp.destroy()
        x.destroy()
    finally:
        p.destroy()


@pytest.mark.parametrize("halo", [False, True])
@pytest.mark.parametrize("impl", ["C", "torch"])
def test_2d_gates_kernel_equals_torch(lib, halo, impl, monkeypatch):
    """A 2D level's gates in one C pass (set-up), or without the kernels in
    one channels-last convolution for all smoothers, equal each smoother's
    own gates() to float32 rounding, with zero ghosts or a periodic halo, on
    the pre/post pair and the 16-step bottom."""
    from deepcd_petsc import mgnet
    if impl == "torch":
        monkeypatch.setattr(kernels, "gates2d", lambda *a: None)
    from deepcd_petsc.model import load_model
    net, _ = load_model()
    g = torch.Generator().manual_seed(3)
    H, W = 37, 70          # not a multiple of the kernel's 64-cell tiles
    fl = (torch.rand(1, 1, 1, H, W, generator=g) > 0.3).float()
    air = (1 - fl) * (torch.rand(1, 1, 1, H, W, generator=g) > 0.5).float()
    geom = torch.cat([fl, air, 1 - fl - air, 4 * torch.rand(1, 1, 1, H, W, generator=g) * fl], 1)
    wrap = mgnet.wrap_pad((False, True, True)) if halo else None
    with torch.inference_mode():
        for sm in [(net.pre[0], net.post[0]), (net.bottom,)]:
            got = mgnet.level_gates(sm, geom, fl, wrap, flat=True)
            for s, gs in zip(sm, got):
                ref = s.gates(geom, wrap, flat=True) * fl
                assert gs.shape == ref.shape and gs.is_contiguous()
                assert (gs - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("shape", [(1, 50, 37), (6, 9, 11)])
def test_setup_kernels_equal_torch(lib, shape, monkeypatch):
    """The set-up's one-pass kernels: the finest coefficient level's operator
    (with _uniform_couplings' range) bit for bit, the axis strengths to
    rounding, both against their torch fallbacks; unit couplings found."""
    from deepcd_petsc import mgnet
    g = torch.Generator().manual_seed(2)
    st = torch.rand((7,) + shape, dtype=torch.float64, generator=g)
    st[1:] *= torch.rand((6,) + shape, generator=g) > 0.2
    flat = shape[0] == 1
    if flat:
        st[1:3] = 0
    fl = (torch.rand((1, 1) + shape, generator=g) > 0.3).float()
    unit = st.clone()
    unit[1:] = (unit[1:] > 0).double()
    got = [(mgnet._level0_operator(s[None], fl, None, flat), mgnet.axis_strengths(s))
           for s in (st, unit)]
    monkeypatch.setattr(kernels, "couplings", lambda *a: None)
    monkeypatch.setattr(kernels, "axis_strengths", lambda *a: None)
    for s, ((sd, sc, lohi), strengths) in zip((st, unit), got):
        rsd, rsc, none = mgnet._level0_operator(s[None], fl, None, flat)
        assert none is None and torch.equal(sd, rsd) and torch.equal(sc, rsc)
        assert mgnet._uniform_couplings(sc, None, lohi) == mgnet._uniform_couplings(rsc)
        np.testing.assert_allclose(strengths, mgnet.axis_strengths(s), rtol=1e-13)
    assert mgnet._uniform_couplings(got[1][0][1], None, got[1][0][2]) == 1.0
    assert mgnet._uniform_couplings(got[0][0][1], None, got[0][0][2]) is False
