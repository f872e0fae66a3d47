"""The V-cycle network (the default architecture): its per-level operator is
the scene's matrix, sizes and levels, masking, homogeneity, dtypes, the
receptive field, and that even the untrained network is a good direction
generator."""
import numpy as np
import pytest
import torch

from deepcd_petsc.evaluate import TorchSystem, dcdm
from deepcd_petsc.mgnet import MGNet, levels_for, neighbour_sum
from deepcd_petsc.model import build, dirichlet_fraction, load_model, save_checkpoint
from deepcd_petsc.operator import PoissonOperator
from deepcd_petsc.scenes import AIR, FLUID, SOLID, make_flags


def prepared(net, flags, faces, dtype=torch.float64):
    with torch.no_grad():
        return net.prepare(flags, dirichlet_fraction(flags, faces), dtype=dtype)


def run(net, flags, faces, r, dtype=torch.float32):
    with torch.no_grad():
        geo = prepared(net, flags, faces, dtype)
        return net(r.to(dtype)[None, None], geo)[0, 0]


@pytest.mark.parametrize("scene,shape", [("liquid", (16, 16, 16)), ("spheres", (13, 17, 11)),
                                         ("smoke", (16, 12, 20)), ("box", (8, 8, 8))])
def test_finest_level_operator_is_the_scene_matrix(scene, shape):
    """The network rebuilds A from the flags and the Dirichlet fraction
    alone: open faces (which the flags cannot show) included."""
    flags, faces = make_flags(scene, shape, 3)
    net = MGNet()
    geo = prepared(net, flags, faces)
    lv = geo["levels"][0]
    D, H, W = shape
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * torch.from_numpy(flags == FLUID)
    pad = geo["pad"]
    xp = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))[None, None]
    ours = net._apply_A(lv, xp, None)[0, 0, :D, :H, :W]
    ref = PoissonOperator(flags, faces)(x) * torch.from_numpy(flags == FLUID)
    assert torch.allclose(ours, ref, atol=1e-12), (ours - ref).abs().max()
    if faces:
        assert (lv["diag"][0, 0, :D, :H, :W][torch.from_numpy(flags == FLUID)] == 6).any()


def test_neighbour_sum():
    x = torch.zeros(1, 1, 4, 5, 6, dtype=torch.float64)
    x[0, 0, 1, 2, 3] = 1.0
    s = neighbour_sum(x)
    assert s.sum() == 6 and s[0, 0, 1, 2, 3] == 0
    for k, j, i in ((0, 2, 3), (2, 2, 3), (1, 1, 3), (1, 3, 3), (1, 2, 2), (1, 2, 4)):
        assert s[0, 0, k, j, i] == 1


@pytest.mark.parametrize("shape,levels", [((64, 64, 64), 5), ((29, 40, 33), 3), ((128, 128, 128), 6),
                                          ((1024, 1024, 512), 7), ((7, 30, 30), 1), ((8, 8, 8), 2)])
def test_levels_follow_the_grid(shape, levels):
    net = MGNet()
    assert levels_for(shape, 7, 4) == net.levels_for(shape) == levels
    assert net.multiple_for(shape) == 2 ** (levels - 1)
    if min(shape) <= 40:
        flags = np.zeros(shape, np.int8)
        geo = prepared(net, flags, ())
        assert geo["L"] == levels and len(geo["levels"]) == levels


@pytest.mark.parametrize("shape", [(29, 40, 33), (9, 7, 5), (5, 4, 4), (16, 16, 16)])
def test_output_shape_mask_and_homogeneity(shape):
    flags, faces = make_flags("liquid", shape, sum(shape))
    torch.manual_seed(1)
    net = MGNet().double().eval()
    r = torch.randn(shape, dtype=torch.float64)
    y = run(net, flags, faces, r, torch.float64)
    assert y.shape == shape and torch.isfinite(y).all()
    off = torch.from_numpy(flags != FLUID)
    assert (y[off] == 0).all() and (y[~off] != 0).any()
    # input on non-fluid cells is ignored
    r2 = r.clone()
    r2[off] = 1e3
    assert torch.equal(run(net, flags, faces, r2, torch.float64), y)
    # positively homogeneous (in fact linear) in r
    for c in (1e-6, 3.5, -2.0):
        yc = run(net, flags, faces, c * r, torch.float64)
        assert torch.allclose(yc, c * y, rtol=1e-12, atol=1e-14 * abs(c) * y.abs().max()), c


def test_untrained_network_is_a_damped_jacobi_vcycle_and_is_spd_like():
    """At initialisation the gates are 1 on fluid, kernels ω·identity: f is a
    symmetric V-cycle, so yᵀr > 0 and DCDM converges fast already."""
    net = MGNet().eval()
    flags, faces = make_flags("spheres", (24, 24, 24), 11)
    geo = prepared(net, flags, faces, torch.float32)
    for lv in geo["levels"]:
        for g in lv["gates"]:   # premultiplied by the fluid mask
            assert torch.equal(g, lv["fluid"].expand_as(g))
    torch.manual_seed(2)
    r = torch.randn(24, 24, 24) * torch.from_numpy(flags == FLUID)
    s = torch.randn(24, 24, 24) * torch.from_numpy(flags == FLUID)
    with torch.no_grad():
        fr = net(r[None, None].double(), prepared(net.double(), flags, faces))[0, 0]
        fs = net(s[None, None].double(), prepared(net, flags, faces))[0, 0]
    assert (fr * r.double()).sum() > 0
    # symmetric: sᵀ f(r) = rᵀ f(s)
    assert torch.isclose((s.double() * fr).sum(), (r.double() * fs).sum(), rtol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float32, 1e-5)])
def test_dtypes_agree_with_float64(dtype, tol):
    flags, faces = make_flags("spheres", (20, 18, 16), 5)
    torch.manual_seed(0)
    net = MGNet().eval()
    r = torch.randn(20, 18, 16)
    ref = run(net.double(), flags, faces, r.double(), torch.float64)
    y = run(net.to(dtype), flags, faces, r, dtype)
    assert y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


def test_receptive_field_is_exact():
    """Perturbing one input cell changes outputs up to rf//2 cells away and
    no farther (a small configuration so the window fits)."""
    torch.manual_seed(4)
    net = MGNet(max_levels=2, nu=1, coarse_its=2).double().eval()
    with torch.no_grad():   # trained kernels use their face taps
        for sm in (*net.pre, *net.post, net.bottom):
            sm.kernel.add_(0.1 * torch.rand_like(sm.kernel))
    shape = (8, 8, 64)
    L = net.levels_for(shape)
    assert L == 2
    rf = net.receptive_field(L)
    flags = np.zeros(shape, np.int8)
    geo = prepared(net, flags, ())
    torch.manual_seed(5)
    r = torch.randn(shape, dtype=torch.float64)
    reach = 0
    for p in (31, 32):
        r2 = r.clone()
        r2[4, 4, p] += 3.0
        with torch.no_grad():
            d = (net(r2[None, None], geo) - net(r[None, None], geo))[0, 0]
        changed = (d.abs() > 0).any(0).any(0).nonzero().flatten()
        reach = max(reach, p - changed.min().item(), changed.max().item() - p)
    assert reach == rf // 2, (reach, rf)


def test_dcdm_with_untrained_network_beats_cg():
    net = MGNet().eval()
    s = TorchSystem("smoke", (32, 32, 32), 4)
    with torch.no_grad():
        geo = net.prepare(s.flags, dirichlet_fraction(s.flags, s.faces))
    its, hist = dcdm(s, net, geo, northo=2, maxit=100)
    assert hist[-1] <= 1e-6 and its <= 20, (its, hist[-1])


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    net = MGNet(nu=1, coarse_its=4)
    with torch.no_grad():
        net.coarse_scale.add_(torch.randn_like(net.coarse_scale))
        net.pre[0].kernel.add_(0.1)
    save_checkpoint(str(tmp_path / "m.pt"), net, {"steps": 1})
    loaded, ck = load_model(str(tmp_path / "m.pt"))
    assert ck["config"]["arch"] == "vcycle" and ck["config"]["nu"] == 1
    assert isinstance(build(ck["config"]), MGNet)
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_inference_path_equals_autograd_path():
    """The in-place inference path computes the same function as the
    differentiable one used in training."""
    torch.manual_seed(6)
    net = MGNet().double()
    with torch.no_grad():
        for sm in (*net.pre, *net.post, net.bottom):
            sm.kernel.add_(0.05 * torch.randn_like(sm.kernel))
    flags, faces = make_flags("liquid", (24, 20, 18), 2)
    r = torch.randn(1, 1, 24, 20, 18, dtype=torch.float64)
    geo = prepared(net, flags, faces)
    with torch.no_grad():
        fast = net(r, geo)
    slow = net(r.requires_grad_(), geo)
    assert slow.requires_grad
    assert torch.allclose(fast, slow.detach(), rtol=1e-12, atol=1e-14 * slow.abs().max().item())


def test_dense_coarsest_level_equals_the_sweeps(monkeypatch):
    """At inference a small coarsest level is one precomputed matrix; it is
    the same linear map as the smoothing sweeps it replaces."""
    import deepcd_petsc.mgnet as mgnet
    torch.manual_seed(8)
    net = MGNet().double().eval()
    with torch.no_grad():
        net.bottom.kernel.add_(0.05 * torch.randn_like(net.bottom.kernel))
    flags, faces = make_flags("smoke", (32, 28, 24), 3)
    r = torch.randn(1, 1, 32, 28, 24, dtype=torch.float64)
    out = {}
    for cells in (0, mgnet.DENSE_CELLS):
        monkeypatch.setattr(mgnet, "DENSE_CELLS", cells)
        with torch.inference_mode():
            geo = prepared(net, flags, faces)
            assert ("dense" in geo["levels"][-1]) == (cells > 0)
            out[cells] = net(r, geo)
    a, b = out[0], out[mgnet.DENSE_CELLS]
    assert ((a - b).norm() / a.norm()).item() < 1e-12


@pytest.mark.parametrize("scene,shape,cap", [("spheres", (64, 64, 64), None),
                                             ("liquid", (33, 40, 29), None),
                                             ("smoke", (5, 4, 4), None),
                                             ("box", (32, 32, 32), 2)])
def test_fused_kernels_equal_torch_path(scene, shape, cap):
    """kernels.c's V-cycle (the CPU float32 inference path) against the torch
    path, with the trained weights: equal to float32 rounding. Padded odd
    grids; cap 2: a 16³ coarsest level by sweeps, not the dense matrix."""
    from deepcd_petsc import kernels
    from deepcd_petsc.model import default_model_path
    assert kernels.load() is not None, kernels.status()
    net, _ = load_model(default_model_path())
    net.level_cap = cap
    flags, faces = make_flags(scene, shape, 5)
    geo = prepared(net, flags, faces, torch.float32)
    assert ("dense" in geo["levels"][-1]) == (cap is None)
    r = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = net(r, geo)
        net.fused = False
        plain = net(r, geo)
    assert "fused" in geo["levels"][0]          # the kernels really ran
    err = ((fused - plain).abs().max() / plain.abs().max()).item()
    assert 0 < plain.abs().max() and err < 1e-5, err


@pytest.mark.parametrize("shape,scale,inplace", [((64, 64, 64), 1.0, False),
                                                  ((33, 40, 29), 1e-3, False),
                                                  ((33, 40, 29), 1.0, True)])
def test_apply_into_equals_the_cast_path(shape, scale, inplace):
    """The cast folded into the first and last fused passes (float64 in,
    float64 out, no float32 copies) gives f(scale·r) of the usual path:
    padded odd grids, a scale, input and output the same array."""
    from deepcd_petsc.model import default_model_path
    net, _ = load_model(default_model_path())
    flags, faces = make_flags("liquid", shape, 3)
    geo = prepared(net, flags, faces, torch.float32)
    r = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = net((r.float() * scale)[None, None], geo)[0, 0].double()
        out = r.clone() if inplace else torch.full(shape, float("nan"), dtype=torch.float64)
        assert net.apply_into(out if inplace else r, out, geo, scale)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert 0 < ref.abs().max() and err < 1e-6, err
    # not taken (the caller casts): wrong dtype, a shape larger than the field
    with torch.inference_mode():
        assert not net.apply_into(r.float(), out.float(), geo)
        big = torch.zeros(shape[0] + 64, *shape[1:], dtype=torch.float64)
        assert not net.apply_into(big, big, geo)


def test_fused_result_is_a_fresh_tensor_unless_reuse():
    net = MGNet()
    flags, faces = make_flags("spheres", (16, 16, 16), 1)
    geo = prepared(net, flags, faces, torch.float32)
    g = torch.Generator().manual_seed(0)
    r1, r2 = (torch.randn(1, 1, 16, 16, 16, generator=g) for _ in range(2))
    with torch.no_grad():
        y1 = net(r1, geo)
        keep = y1.clone()
        y2 = net(r2, geo)
        assert torch.equal(y1, keep) and not torch.equal(y1, y2)
        v1 = net(r1, geo, reuse=True)
        v2 = net(r2, geo, reuse=True)
    assert v1.data_ptr() == v2.data_ptr()       # the level's buffer, overwritten
    assert torch.allclose(v2, y2)


def test_training_keeps_the_autograd_path():
    net = MGNet()
    flags, faces = make_flags("liquid", (16, 16, 16), 2)
    with torch.no_grad():
        geo = net.prepare(flags, dirichlet_fraction(flags, faces))
    y = net(torch.randn(1, 1, 16, 16, 16), geo)
    assert y.requires_grad and "fused" not in geo["levels"][0]


def test_fused_path_ignores_default_dtype_and_layout():
    """The fused kernels' buffers are float32 whatever torch's default
    dtype, and a non-contiguous input gives the contiguous result."""
    net = MGNet()
    flags, faces = make_flags("spheres", (16, 12, 20), 4)
    geo = prepared(net, flags, faces, torch.float32)
    r = torch.randn(20, 12, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net(r.permute(2, 1, 0).contiguous()[None, None], geo)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            geo2 = prepared(net, flags, faces, torch.float32)
            other = net(r.permute(2, 1, 0)[None, None], geo2)
        finally:
            torch.set_default_dtype(old)
    assert "fused" in geo2["levels"][0] and other.dtype == torch.float32
    assert torch.allclose(other, ref, rtol=0, atol=1e-6 * ref.abs().max())
