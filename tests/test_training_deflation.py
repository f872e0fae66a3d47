"""Island deflation in the training loss (training/deflation.py): the
sampled right-hand sides are residuals of the deflated KSP, the outputs
its projected directions, and the loss ignores what the KSP removes."""
import numpy as np
import pytest
import torch

from deepcd_petsc.coefficients import scene_operator
from deepcd_petsc.mgnet import DEFAULT_MG_CONFIG
from deepcd_petsc.model import read_checkpoint
from deepcd_petsc.operator import StencilOperator
from deepcd_petsc.training.deflation import TrainingDeflation
from deepcd_petsc.training.trainer import dcdm_loss, train
from helpers import run_cli

SHAPE = (20, 24, 28)       # (nz, ny, nx), held out from the training sizes


def _z(defl, shape):
    """Z as a dense (k, n) float64 matrix, from the labels."""
    z = torch.zeros(defl.count, int(np.prod(shape)), dtype=torch.float64)
    z[defl.lab, defl.cells] = 1.0
    return z


@pytest.mark.parametrize("fam,seed", [("density", 2), ("stretch", 5)])
def test_deflated_residuals_directions_and_loss(fam, seed):
    _, _, st = scene_operator(fam, SHAPE, seed)
    defl = TrainingDeflation.of(st, 8)
    assert defl is not None and 0 < defl.islands < defl.count
    op = StencilOperator(st, dtype=torch.float32)
    op64 = StencilOperator(st)
    z = _z(defl, SHAPE)
    # E⁺ inverts ZᵀAZ computed by the operator, one vector at a time
    az = torch.stack([op64(v.reshape(SHAPE)).reshape(-1) for v in z])
    e = z @ az.T
    assert torch.allclose(defl.einv.double() @ e, torch.eye(defl.count, dtype=torch.float64), atol=1e-3)
    gen = torch.Generator().manual_seed(0)
    active = torch.from_numpy(st.active().astype(np.float32))
    b = torch.randn(3, *SHAPE, generator=gen) * active
    r = defl.residual(b)
    assert torch.allclose(r.reshape(3, -1).norm(dim=1), torch.ones(3))
    zr = r.reshape(3, -1).double() @ z.T
    assert zr.abs().max() < 1e-5 * (b.reshape(3, -1).double() @ z.T).abs().max()
    q = torch.randn(3, *SHAPE, generator=gen) * active
    d = defl.project(q)
    zad = op64(d.double()).reshape(3, -1) @ z.T
    assert zad.abs().max() < 1e-4 * (op64(q.double()).reshape(3, -1) @ z.T).abs().max()
    # what the KSP projects away costs nothing: a good direction (A⁻¹r by
    # CG) keeps its small loss with any Z y added, which the plain loss
    # would count
    x = _cg(op64, r[0].double()).float()[None]
    y = torch.randn(1, defl.count, generator=gen)
    x2 = x + (y.double() @ z).float().reshape(x.shape) * x.abs().max()
    l1 = dcdm_loss(r[:1], defl.project(x), op)
    l2 = dcdm_loss(r[:1], defl.project(x2), op)
    assert l1 < 1e-3 and l2 < 1e-3
    assert dcdm_loss(r[:1], x2, op) > 100 * l2


def _cg(op, b, rtol=1e-6, maxit=6000):
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum()
    for _ in range(maxit):
        if rr.sqrt() <= rtol * b.norm():
            break
        ap = op(p)
        a = rr / (p * ap).sum()
        x += a * p
        r -= a * ap
        rr, rr0 = (r * r).sum(), rr
        p = r + rr / rr0 * p
    return x


@pytest.mark.parametrize("fam", ["perm", "aniso", "periodic"])
def test_operators_without_islands_train_as_before(fam):
    _, _, st = scene_operator(fam, SHAPE, 3)
    assert TrainingDeflation.of(st, 8) is None
    assert TrainingDeflation.of(None, 8) is None          # a flag scene


def test_training_with_deflation_records_it_and_resumes(tmp_path):
    cfg = dict(DEFAULT_MG_CONFIG)
    kw = dict(n=16, scenes=("density", "perm"), geometries=1, lanczos=30, batch=2, config=cfg,
              progress=False, log=lambda *a: None, cache=str(tmp_path / "cache"))
    out = tmp_path / "d.pt"
    net, meta = train(str(out), steps=6, deflate=8, **kw)
    assert meta["deflate"] == 8 and np.isfinite(meta["losses"]).all()
    _, plain = train(str(tmp_path / "p.pt"), steps=6, **kw)
    assert plain["deflate"] == 0
    # same data, weights and geometry draws: the density steps differ
    assert meta["losses"] != plain["losses"]
    _, part = train(str(tmp_path / "r.pt"), steps=6, stop_at=3, deflate=8, **kw)
    _, res = train(str(tmp_path / "r.pt"), steps=6, resume=True, **kw)
    assert res["deflate"] == 8 and res["losses"] == meta["losses"]
    assert read_checkpoint(str(out))["meta"]["deflate"] == 8


def test_negative_deflate_is_one_line(tmp_path):
    r = run_cli(["train", "--out", str(tmp_path / "m.pt"), "--deflate", "-1", "--steps", "1"])
    assert r.returncode != 0
    assert "--deflate must be >= 0" in r.stderr and "Traceback" not in r.stderr


def test_steps_zero_builds_the_cache_only(tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "m.pt"
    out.write_bytes(b"a trained model")
    r = run_cli(["train", "--out", str(out), "--n", "8", "--scenes", "spheres,density",
                 "--geometries", "1", "--lanczos", "12", "--steps", "0", "--deflate", "4",
                 "--cache", str(cache), "--threads", "1"])
    assert r.returncode == 0, r.stderr
    assert "not written" in r.stdout
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["density", "spheres"]
    assert out.read_bytes() == b"a trained model" and not (tmp_path / "m.pt.state").exists()
    for args, msg in ((["--steps", "0"], "give --cache DIR"), (["--steps", "-3"], "--steps must be >= 0")):
        bad = run_cli(["train", "--out", str(out), *args])
        assert bad.returncode != 0 and msg in bad.stderr and "Traceback" not in bad.stderr


def test_float64_corrections_on_an_ill_conditioned_e():
    """2D cells stretched over 128 rows: E's condition is ~10⁷, where the
    corrections formed in float32 kept Zᵀr at 4× Zᵀb; past float64 (256
    rows) the operator trains with the plain loss."""
    _, _, st = scene_operator("stretch", (1, 128, 32), 1)
    defl = TrainingDeflation.of(st, 16)
    assert defl is not None and defl.count > 100
    z = _z(defl, st.shape)
    b = torch.randn(2, *st.shape, generator=torch.Generator().manual_seed(3))
    zb = b.reshape(2, -1).double() @ z.T
    zr = defl.residual(b).reshape(2, -1).double() @ z.T
    assert zr.abs().max() < 1e-5 * zb.abs().max()
    _, _, st = scene_operator("stretch", (1, 256, 64), 1)
    assert TrainingDeflation.of(st, 16) is None
