"""Training pieces: the matrix-free operator, the scale-invariant loss,
Lanczos Ritz data, geometry caching and the training loop (convergence,
determinism, resume)."""
import os

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from petsc4py import PETSc

from deepcd_petsc.model import read_checkpoint
from deepcd_petsc.operator import PoissonOperator
from deepcd_petsc.problem import Problem
from deepcd_petsc.scenes import FLUID, make_flags
from deepcd_petsc.training.data import Geometry, cache_name, make_geometry
from deepcd_petsc.training.lanczos import lanczos_ritz
from deepcd_petsc.training.trainer import dcdm_loss, train
from helpers import TINY, reference_matrix

SCENES = ["box", "smoke", "spheres", "liquid"]




def petsc_matrix(flags, faces):
    """A assembled by PETSc as scipy CSR (serial: PETSc order = natural)."""
    pb = Problem(flags, faces)
    try:
        indptr, indices, data = pb.A.getValuesCSR()
        N = pb.A.getSize()[0]
        return sp.csr_matrix((data, indices, indptr), shape=(N, N))
    finally:
        pb.destroy()


def fluid_matrix(flags, faces):
    idx = np.flatnonzero(flags.ravel() == FLUID)
    A = petsc_matrix(flags, faces)
    return A[idx][:, idx].tocsr(), idx


# ------------------------------------------------------------- operator
@pytest.mark.parametrize("scene", SCENES)
@pytest.mark.parametrize("seed", [0, 3])
def test_operator_equals_petsc_matrix(scene, seed):
    nx, ny, nz = 7, 6, 5
    flags, faces = make_flags(scene, (nz, ny, nx), seed)
    assert PETSc.COMM_WORLD.getSize() == 1
    pb = Problem(flags, faces)
    try:
        x = pb.A.createVecRight()
        y = pb.A.createVecLeft()
        rng = np.random.default_rng(seed)
        xa = rng.standard_normal(flags.size)
        with x as xarr:
            xarr[:] = xa
        pb.A.mult(x, y)
        ref = y.getArray(readonly=True).copy()
        x.destroy()
        y.destroy()
    finally:
        pb.destroy()
    op = PoissonOperator(flags, faces, dtype=torch.float64)
    got = op(torch.from_numpy(xa.reshape(nz, ny, nx))).reshape(-1).numpy()
    assert np.allclose(got, ref, rtol=0, atol=1e-12), np.abs(got - ref).max()
    # and the independent loop-based reference of test_problem.py
    R = reference_matrix(flags, faces)
    assert np.allclose(got, R @ xa, rtol=0, atol=1e-12)


def test_operator_batched_and_float32():
    flags, faces = make_flags("liquid", (6, 7, 8), 1)
    op64 = PoissonOperator(flags, faces, dtype=torch.float64)
    op32 = PoissonOperator(flags, faces, dtype=torch.float32)
    x = torch.randn(3, *flags.shape, dtype=torch.float64)
    y = op64(x)
    assert y.shape == x.shape
    for i in range(3):
        assert torch.equal(y[i], op64(x[i]))
    y32 = op32(x.float())
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), y, rtol=1e-5, atol=1e-5)
    # (N, 1, D, H, W) as the network produces it
    assert torch.equal(op64(x[:, None])[:, 0], y)


# ------------------------------------------------------------------ loss
@pytest.mark.parametrize("c", [1e-3, 2.0, -5.0])
def test_loss_scale_invariant(c):
    flags, faces = make_flags("spheres", (8, 8, 8), 2)
    op = PoissonOperator(flags, faces, dtype=torch.float64)
    fluid = torch.from_numpy(flags == FLUID)
    torch.manual_seed(0)
    b = torch.randn(4, *flags.shape, dtype=torch.float64) * fluid
    q = torch.randn(4, *flags.shape, dtype=torch.float64) * fluid
    l0 = dcdm_loss(b, q, op)
    assert l0.dim() == 0 and l0.item() > 0
    assert dcdm_loss(b, c * q, op).item() == pytest.approx(l0.item(), rel=1e-10)


def test_loss_zero_for_exact_solution():
    flags, faces = make_flags("spheres", (6, 6, 6), 4)
    A, idx = fluid_matrix(flags, faces)
    op = PoissonOperator(flags, faces, dtype=torch.float64)
    rng = np.random.default_rng(0)
    b = np.zeros(flags.size)
    b[idx] = rng.standard_normal(len(idx))
    b /= np.linalg.norm(b)
    q = np.zeros(flags.size)
    q[idx] = spla.spsolve(A.tocsc(), b[idx])
    bt = torch.from_numpy(b.reshape(flags.shape))[None]
    assert dcdm_loss(bt, 3.0 * torch.from_numpy(q.reshape(flags.shape))[None], op).item() < 1e-20
    # a random direction leaves a positive, finite loss
    qr = torch.randn(5, *flags.shape, dtype=torch.float64) * torch.from_numpy(flags == FLUID)
    lr = dcdm_loss(bt.expand(5, -1, -1, -1), qr, op).item()
    assert np.isfinite(lr) and lr > 1e-3


# --------------------------------------------------------------- Lanczos
def test_lanczos_matches_eigsh():
    flags, faces = make_flags("spheres", (4, 5, 6), 1)
    A, idx = fluid_matrix(flags, faces)
    n = len(idx)
    vals, vecs = lanczos_ritz(lambda v: A @ v, n, n, np.random.default_rng(0))
    assert np.all(np.diff(vals) >= 0), "Ritz values must ascend"
    assert vecs.shape == (len(vals), n) and vecs.dtype == np.float32
    hi = spla.eigsh(A, k=4, which="LA", return_eigenvectors=False)
    lo = spla.eigsh(A, k=4, which="SA", return_eigenvectors=False)
    dense = np.linalg.eigvalsh(A.toarray())
    assert dense[0] > 1e-8, "scene expected to be non-singular"
    scale = dense[-1]
    # the extremes match exactly; every other eigsh value is a Ritz value
    # (Lanczos finds each distinct eigenvalue once)
    assert abs(vals[-1] - hi.max()) <= 1e-8 * scale
    assert abs(vals[0] - lo.min()) <= 1e-8 * scale
    for lam in np.concatenate([hi, lo]):
        assert np.min(np.abs(vals - lam)) <= 1e-8 * scale, lam
    distinct = np.unique(np.round(dense / scale, 9))
    assert len(vals) == len(distinct)
    # Ritz vectors: orthonormal (float32), eigenvectors
    V = vecs.astype(np.float64)
    assert np.allclose(V @ V.T, np.eye(len(vals)), atol=1e-5)
    res = np.linalg.norm(A @ V.T - V.T * vals, axis=0)
    assert res.max() <= 1e-5 * scale, res.max()


def test_lanczos_closed_box_drops_null_space():
    flags, faces = make_flags("box", (4, 5, 6), 0)
    assert not faces
    A, idx = fluid_matrix(flags, faces)
    n = len(idx)
    dense = np.linalg.eigvalsh(A.toarray())
    assert abs(dense[0]) < 1e-10  # singular: constants
    vals, vecs = lanczos_ritz(lambda v: A @ v, n, n, np.random.default_rng(1))
    assert np.all(vals > 1e-8)
    assert vals[0] == pytest.approx(dense[1], rel=1e-8)
    assert vals[-1] == pytest.approx(dense[-1], rel=1e-8)
    # Ritz vectors orthogonal to the constant vector
    ones = np.ones(n) / np.sqrt(n)
    assert np.abs(vecs.astype(np.float64) @ ones).max() < 1e-5


def test_lanczos_few_steps():
    flags, faces = make_flags("liquid", (6, 6, 6), 2)
    A, idx = fluid_matrix(flags, faces)
    vals, vecs = lanczos_ritz(lambda v: A @ v, len(idx), 10, np.random.default_rng(0))
    assert len(vals) == 10 and vecs.shape == (10, len(idx))
    dense = np.linalg.eigvalsh(A.toarray())
    # Ritz values interlace: inside the spectrum, extremes converge first
    assert dense[0] - 1e-10 <= vals[0] and vals[-1] <= dense[-1] + 1e-10
    assert vals[-1] > 0.9 * dense[-1]


# ---------------------------------------------------------------- data
def test_geometry_sample():
    g = make_geometry("liquid", (8, 9, 10), 4, 30)
    assert isinstance(g, Geometry)
    gen = torch.Generator().manual_seed(0)
    b = g.sample(5, gen)
    assert b.shape == (5, 8, 9, 10)
    assert b.dtype == torch.float32
    assert torch.allclose(b.reshape(5, -1).norm(dim=1), torch.ones(5), atol=1e-5)
    off = torch.from_numpy(g.flags != FLUID)
    assert off.any() and (b[:, off] == 0).all()
    # samples lie in the span of the Ritz vectors, and differ
    V = g.ritz_vectors.double()
    bf = b.reshape(5, -1)[:, g.fluid_idx].double()
    proj = bf @ V.T @ V
    assert torch.allclose(proj, bf, atol=1e-4)
    assert not torch.allclose(b[0], b[1])
    # same generator state, same samples
    assert torch.equal(g.sample(5, torch.Generator().manual_seed(0)), b)
    # low part of the spectrum is weighted up: the Rayleigh quotient is
    # below that of unweighted combinations on average
    op = PoissonOperator(g.flags, g.open_faces, dtype=torch.float64)
    bw = g.sample(200, torch.Generator().manual_seed(1)).double()
    bu = g.sample(200, torch.Generator().manual_seed(1), low_weight=1.0).double()
    rq = lambda v: ((v * op(v)).sum((1, 2, 3))).mean().item()
    assert rq(bw) < rq(bu)


def test_make_geometry_cache(tmp_path):
    shape, seed, m = (8, 7, 6), 11, 25
    g1 = make_geometry("spheres", shape, seed, m, str(tmp_path))
    path = tmp_path / cache_name("spheres", shape, seed, m)
    assert path.name == "spheres-6x7x8-s11-m25.npz"
    assert sorted(os.listdir(tmp_path)) == [path.name], "temp files left behind"
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"flags", "open_faces", "ritz_values", "ritz_vectors"}
        flags, faces_s = z["flags"], str(z["open_faces"])
        vals, vecs = z["ritz_values"], z["ritz_vectors"]
    ref_flags, ref_faces = make_flags("spheres", shape, seed)
    assert flags.dtype == np.int8 and flags.shape == shape
    assert np.array_equal(flags, ref_flags)
    assert faces_s == ",".join(sorted(ref_faces)) == "z+"
    n_fluid = int((flags == FLUID).sum())
    assert vals.dtype == np.float64 and vals.ndim == 1
    assert np.all(np.diff(vals) >= 0) and np.all(vals > 1e-8)
    assert vecs.dtype == np.float32 and vecs.shape == (len(vals), n_fluid)
    assert len(vals) <= m
    assert np.array_equal(vals, g1.ritz_values)
    assert np.array_equal(vecs, g1.ritz_vectors.numpy())
    # Ritz pairs of the scene's operator over fluid cells in natural order
    A, idx = fluid_matrix(ref_flags, ref_faces)
    r = np.linalg.norm(A @ vecs[-1].astype(np.float64) - vals[-1] * vecs[-1])
    assert r < 1e-3 * vals[-1]
    # second call reads the cache: same arrays ...
    g2 = make_geometry("spheres", shape, seed, m, str(tmp_path))
    assert np.array_equal(g2.flags, g1.flags) and g2.open_faces == g1.open_faces
    assert np.array_equal(g2.ritz_values, g1.ritz_values)
    assert torch.equal(g2.ritz_vectors, g1.ritz_vectors)
    assert torch.equal(g2.dirichlet, g1.dirichlet)
    # ... really from the file: a changed file is what comes back
    np.savez(path, flags=flags, open_faces=faces_s, ritz_values=vals * 2, ritz_vectors=vecs)
    g3 = make_geometry("spheres", shape, seed, m, str(tmp_path))
    assert np.array_equal(g3.ritz_values, 2 * vals)
    # the cache key includes the Lanczos steps
    make_geometry("spheres", shape, seed, m + 1, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2


# --------------------------------------------------------------- training
def quiet_train(out, **kw):
    args = dict(n=16, scenes=("spheres",), geometries=1, lanczos=60, steps=60, batch=4,
                config=dict(TINY), progress=False, log=lambda *a: None)
    args.update(kw)
    return train(str(out), **args)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lanczos"))


def test_training_lowers_loss(tmp_path, cache):
    out = tmp_path / "m.pt"
    net, meta = quiet_train(out, cache=cache)
    losses = meta["losses"]
    assert len(losses) == 60 and meta["steps"] == 60
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first, (first, last)
    assert not net.training
    assert out.exists() and (tmp_path / "m.pt.state").exists()
    ck = read_checkpoint(str(out))
    assert ck["config"] == TINY
    assert ck["meta"]["losses"] == losses
    assert ck["meta"]["scenes"] == ["spheres"] and ck["meta"]["n"] == 16
    for k, v in net.state_dict().items():
        assert torch.equal(ck["state_dict"][k], v)
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.pt.state"]


def test_training_the_vcycle_network_cuts_iterations(tmp_path, cache):
    """The default architecture: a short run lowers the paper's loss and the
    DCDM iterations on a held-out geometry, from the damped-Jacobi V-cycle
    it starts as."""
    from deepcd_petsc.evaluate import TorchSystem, dcdm
    from deepcd_petsc.mgnet import DEFAULT_MG_CONFIG, MGNet
    from deepcd_petsc.model import dirichlet_fraction
    net, meta = quiet_train(tmp_path / "v.pt", config=dict(DEFAULT_MG_CONFIG), steps=40,
                            lr=3e-3, cache=cache)
    assert isinstance(net, MGNet)
    losses = meta["losses"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:3]), losses
    s = TorchSystem("spheres", (16, 16, 16), seed=2)
    its = {}
    for name, model in (("init", MGNet().eval()), ("trained", net)):
        with torch.inference_mode():
            geo = model.prepare(s.flags, dirichlet_fraction(s.flags, s.faces))
        its[name], hist = dcdm(s, model, geo)
        assert hist[-1] <= 1e-6
    assert its["trained"] < its["init"], its


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_deterministic(tmp_path, cache):
    n1, m1 = quiet_train(tmp_path / "a.pt", steps=12, cache=cache)
    n2, m2 = quiet_train(tmp_path / "b.pt", steps=12, cache=cache)
    assert m1["losses"] == m2["losses"]
    assert same_state(n1, n2)
    # and without the cache (Lanczos recomputed) too
    n3, m3 = quiet_train(tmp_path / "c.pt", steps=12)
    assert m3["losses"] == m1["losses"] and same_state(n1, n3)
    # a different seed gives a different model
    n4, _ = quiet_train(tmp_path / "d.pt", steps=12, seed=1, cache=cache)
    assert not same_state(n1, n4)


def test_resume_equals_uninterrupted(tmp_path, cache):
    full, mf = quiet_train(tmp_path / "full.pt", steps=10, cache=cache)
    out = tmp_path / "part.pt"
    _, mp = quiet_train(out, steps=10, stop_at=5, cache=cache)
    assert mp["steps"] == 5 and len(mp["losses"]) == 5
    assert read_checkpoint(str(out))["meta"]["steps"] == 5
    # resume takes its settings from the checkpoint, not from the arguments
    res, mr = train(str(out), steps=10, resume=True, cache=cache, progress=False,
                    log=lambda *a: None)
    assert mr["steps"] == 10
    assert mr["losses"] == mf["losses"]
    assert same_state(res, full)
    assert read_checkpoint(str(out))["meta"]["losses"] == mf["losses"]


def test_resume_without_state_raises(tmp_path, cache):
    out = tmp_path / "none.pt"
    with pytest.raises(ValueError, match="cannot resume"):
        quiet_train(out, steps=4, resume=True, cache=cache)
    # a model file alone is not enough either
    quiet_train(out, steps=2, cache=cache)
    os.unlink(str(out) + ".state")
    with pytest.raises(ValueError, match="state"):
        quiet_train(out, steps=4, resume=True, cache=cache)
