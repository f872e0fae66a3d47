"""The DCDM network: shapes, geometry masking, positive homogeneity, dtypes,
the oneDNN convolution, the receptive field, and checkpoint files."""
import os
import pickle

import numpy as np
import pytest

from helpers import TINY
import torch
import torch.nn.functional as F

from deepcd_petsc.model import (FORMAT, VERSION, Conv3d, DCDMNet, ModelFileError,
                                dirichlet_fraction, geometry_channels, load_model,
                                read_checkpoint, save_checkpoint)
from deepcd_petsc.scenes import AIR, FLUID, SOLID, make_flags





def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    return DCDMNet(**{**TINY, **kw}).eval()


def liquid(shape_zyx, seed=3):
    flags, faces = make_flags("liquid", shape_zyx, seed)
    assert (flags == FLUID).any() and (flags == SOLID).any() and (flags == AIR).any()
    return flags, faces


def run(net, flags, faces, r, dtype=torch.float32):
    with torch.no_grad():
        geo = net.prepare(flags, dirichlet_fraction(flags, faces), dtype=dtype)
        return net(r.to(dtype)[None, None], geo)[0, 0]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(29, 40, 33), (9, 7, 5), (16, 16, 16)])
@pytest.mark.parametrize("default", [False, True], ids=["tiny", "default"])
def test_output_shape_and_fluid_mask(shape, default):
    torch.manual_seed(1)
    net = (DCDMNet() if default else DCDMNet(channels=[4, 8, 8])).eval()
    flags, faces = liquid(shape, seed=sum(shape))
    r = torch.randn(shape)
    y = run(net, flags, faces, r)
    assert y.shape == shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    off = torch.from_numpy(flags != FLUID)
    assert off.any()
    assert (y[off] == 0).all(), "output must be exactly zero on solid and air cells"
    assert (y[~off] != 0).any()
    # batched input: each sample is processed independently
    with torch.no_grad():
        geo = net.prepare(flags, dirichlet_fraction(flags, faces))
        y2 = net(torch.stack([r, 2 * r])[:, None], geo)
    assert y2.shape == (2, 1, *shape)
    assert torch.allclose(y2[0, 0], y, rtol=1e-5, atol=1e-6 * y.abs().max().item())


def test_input_on_non_fluid_cells_is_ignored():
    shape = (9, 10, 11)
    flags, faces = liquid(shape)
    net = tiny_net()
    r = torch.randn(shape)
    r2 = r.clone()
    r2[torch.from_numpy(flags != FLUID)] = 1e3
    assert torch.equal(run(net, flags, faces, r), run(net, flags, faces, r2))


def test_geometry_channels_and_dirichlet_fraction():
    flags, faces = liquid((8, 9, 10))
    d = dirichlet_fraction(flags, faces)
    assert d.shape == flags.shape
    assert (d[flags != FLUID] == 0).all()
    assert ((d >= 0) & (d <= 1)).all()
    # fluid cells touching air have a positive fraction, deep ones zero
    assert (d > 0).any() and (d[flags == FLUID] == 0).any()
    # one cell by hand: a fluid cell with air directly above
    k, j, i = np.argwhere((flags[:-1] == FLUID) & (flags[1:] == AIR))[0]
    from deepcd_petsc.scenes import padded
    p = padded(flags, faces)
    nbs = [p[k, j + 1, i + 1], p[k + 2, j + 1, i + 1], p[k + 1, j, i + 1],
           p[k + 1, j + 2, i + 1], p[k + 1, j + 1, i], p[k + 1, j + 1, i + 2]]
    nonsolid = sum(n != SOLID for n in nbs)
    air = sum(n == AIR for n in nbs)
    assert d[k, j, i] == pytest.approx(air / nonsolid)
    g = geometry_channels(torch.from_numpy(flags), torch.from_numpy(d))
    assert g.shape == (1, 4, *flags.shape)
    assert torch.equal(g[0, :3].sum(0), torch.ones(flags.shape))
    assert torch.equal(g[0, 0].bool(), torch.from_numpy(flags == FLUID))
    assert torch.equal(g[0, 1].bool(), torch.from_numpy(flags == SOLID))
    assert torch.equal(g[0, 2].bool(), torch.from_numpy(flags == AIR))
    assert torch.allclose(g[0, 3], torch.from_numpy(d).float())


# ----------------------------------------------------- positive homogeneity
@pytest.mark.parametrize("c", [0.01, 3.7, 1000.0])
def test_positive_homogeneity(c):
    shape = (12, 10, 14)
    flags, faces = liquid(shape)
    net = tiny_net()
    r = torch.randn(shape)
    y = run(net, flags, faces, r)
    yc = run(net, flags, faces, c * r)
    assert rel(yc, c * y) < 1e-5


def test_homogeneity_default_config():
    shape = (16, 16, 16)
    flags, faces = liquid(shape)
    torch.manual_seed(0)
    net = DCDMNet().eval()
    r = torch.randn(shape)
    y = run(net, flags, faces, r)
    assert rel(run(net, flags, faces, 250.0 * r), 250.0 * y) < 1e-5


def test_not_odd():
    """Homogeneity is for c > 0 only (PReLU): the network must not be
    linear, otherwise it would be a (weak) fixed linear preconditioner."""
    shape = (8, 8, 8)
    flags, faces = liquid(shape)
    net = tiny_net()
    r = torch.randn(shape)
    assert rel(run(net, flags, faces, -r), -run(net, flags, faces, r)) > 1e-3


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.bfloat16, 5e-2)])
def test_dtypes_agree_with_float32(dtype, tol):
    shape = (12, 11, 10)
    flags, faces = liquid(shape)
    net = tiny_net()
    r = torch.randn(shape)
    y32 = run(net, flags, faces, r)
    net_d = tiny_net().to(dtype)
    y = run(net_d, flags, faces, r, dtype=dtype)
    assert y.dtype == dtype
    assert y.shape == shape
    assert torch.isfinite(y.float()).all()
    assert (y[torch.from_numpy(flags != FLUID)] == 0).all()
    assert rel(y, y32) < tol


# ----------------------------------------------------------- oneDNN Conv3d
@pytest.mark.parametrize("cin,cout,k,bias", [(1, 4, 3, False), (4, 8, 3, False),
                                             (8, 8, 3, False), (16, 4, 1, False),
                                             (4, 8, 3, True)])
def test_conv3d_matches_functional(cin, cout, k, bias):
    torch.manual_seed(cin * 100 + cout)
    conv = Conv3d(cin, cout, k, padding=k // 2, bias=bias)
    x = torch.randn(2, cin, 6, 7, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    b_ref = conv.bias.detach().clone().requires_grad_(True) if bias else None
    y = conv(x)
    y_ref = F.conv3d(x_ref, w_ref, b_ref, padding=k // 2)
    assert y.shape == y_ref.shape == (2, cout, 6, 7, 5)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(conv.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-4)
    if bias:
        assert torch.allclose(conv.bias.grad, b_ref.grad, rtol=1e-4, atol=1e-4)


def test_conv3d_float64_and_bf16():
    torch.manual_seed(0)
    conv = Conv3d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(1, 4, 5, 6, 7)
    ref = F.conv3d(x.double(), conv.weight.double(), None, padding=1)
    assert torch.allclose(conv.double()(x.double()), ref, rtol=1e-12, atol=1e-12)
    yb = conv.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert rel(yb, ref) < 3e-2


# -------------------------------------------------------- receptive field
def test_receptive_field_and_params_are_positive_ints():
    for net in (DCDMNet(), DCDMNet(channels=[4, 8, 8]), DCDMNet(channels=[2, 4])):
        rf, n = net.receptive_field(), net.n_params()
        assert isinstance(rf, int) and rf > 0
        assert isinstance(n, int) and n > 0
        assert n == sum(p.numel() for p in net.parameters())
    assert DCDMNet().receptive_field() > DCDMNet(channels=[4, 8, 8]).receptive_field()
    assert DCDMNet().n_params() > DCDMNet(channels=[4, 8, 8]).n_params()


def influence_x(net, nx, p):
    """(left, right): how far along x the output changes when input cell
    x = p is perturbed (float64, all-fluid closed grid)."""
    w = net.multiple
    shape = (w, w, nx)
    flags = np.zeros(shape, np.int8)
    with torch.no_grad():
        geo = net.prepare(flags, None, dtype=torch.float64)
        torch.manual_seed(5)
        r = torch.randn(shape, dtype=torch.float64)
        r2 = r.clone()
        r2[w // 2, w // 2, p] += 3.0
        d = (net(r2[None, None], geo) - net(r[None, None], geo))[0, 0]
    changed = (d != 0).any(0).any(0).nonzero().flatten()
    assert len(changed) > 0
    return p - changed.min().item(), changed.max().item() - p


@pytest.mark.parametrize("config,nx", [({"channels": [2, 4]}, 48),
                                       ({"channels": [2, 4, 4], "bottom_blocks": 1}, 96)],
                         ids=["2-levels", "3-levels"])
def test_receptive_field_is_exact(config, nx):
    """Perturbing one input cell changes outputs within reach = rf//2 cells
    of it and nothing farther; some alignment with the pooling grid reaches
    exactly that far, and no changed window is wider than rf."""
    torch.manual_seed(0)
    net = DCDMNet(**config).double().eval()
    rf = net.receptive_field()
    m = net.multiple
    assert nx // 2 - m - rf // 2 - 2 >= 0 and nx // 2 + m + rf // 2 + 2 < nx  # window inside the grid
    windows = {p: influence_x(net, nx, p) for p in range(nx // 2 - m, nx // 2 + m)}
    far = {p: w for p, w in windows.items() if max(w) > rf // 2}
    assert not far, f"receptive_field() = {rf}, but outputs change farther than {rf // 2} cells: {far}"
    assert max(l + r + 1 for l, r in windows.values()) <= rf, (rf, windows)
    assert max(max(w) for w in windows.values()) == rf // 2, (rf, windows)


# ------------------------------------------------------------ checkpoints
def save_tiny(path, meta=None, seed=0):
    net = tiny_net(seed)
    save_checkpoint(str(path), net, meta)
    return net


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "m.pt"
    meta = {"steps": 7, "losses": [0.5, 0.25], "scenes": ["spheres"], "note": "x"}
    net = save_tiny(path, meta)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"], "temp files left behind"
    mode = os.stat(path).st_mode & 0o777
    assert mode & 0o444 == 0o444, oct(mode)
    loaded, ck = load_model(str(path))
    assert ck["format"] == FORMAT and ck["version"] == VERSION
    assert ck["meta"] == meta
    assert ck["config"] == net.config == TINY
    assert not loaded.training
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    shape = (10, 9, 8)
    flags, faces = liquid(shape)
    r = torch.randn(shape)
    assert torch.equal(run(net, flags, faces, r), run(loaded, flags, faces, r))
    # float64 load
    l64, _ = load_model(str(path), dtype="float64")
    assert next(l64.parameters()).dtype == torch.float64
    assert rel(run(l64, flags, faces, r, torch.float64), run(net, flags, faces, r)) < 1e-5
    # overwrite in place: still one file, new contents
    save_tiny(path, {"steps": 8}, seed=1)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
    assert read_checkpoint(str(path))["meta"] == {"steps": 8}


def test_unknown_dtype(tmp_path):
    path = tmp_path / "m.pt"
    save_tiny(path)
    with pytest.raises(ModelFileError, match="dtype"):
        load_model(str(path), dtype="float16")


def test_meta_is_plain_json(tmp_path):
    path = tmp_path / "m.pt"
    save_tiny(path, {"n": np.int64(3), "path": tmp_path, "shape": (1, 2)})
    meta = read_checkpoint(str(path))["meta"]
    assert meta["path"] == str(tmp_path)
    assert meta["shape"] == [1, 2]


def good_ckpt():
    net = tiny_net()
    return {"format": FORMAT, "version": VERSION, "config": dict(net.config),
            "state_dict": {k: v.clone() for k, v in net.state_dict().items()}, "meta": {}}


def expect_error(path, *words):
    with pytest.raises(ModelFileError) as ei:
        load_model(str(path))
    msg = str(ei.value)
    assert os.path.basename(str(path)) in msg, msg
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nothere.pt", "does not exist")


def test_text_file(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("this is not a model\n")
    expect_error(p, "not a deepcd checkpoint")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    expect_error(p)


def test_plain_tensor(tmp_path):
    p = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p)
    expect_error(p, "format tag")


def test_wrong_format_tag(tmp_path):
    p = tmp_path / "tag.pt"
    ck = good_ckpt()
    ck["format"] = "something-else"
    torch.save(ck, p)
    expect_error(p, "format tag")


def test_plain_state_dict(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(good_ckpt()["state_dict"], p)
    expect_error(p, "format tag")


def test_wrong_version(tmp_path):
    p = tmp_path / "version.pt"
    ck = good_ckpt()
    ck["version"] = VERSION + 1
    torch.save(ck, p)
    expect_error(p, "version", str(VERSION + 1))


def test_missing_state_dict(tmp_path):
    p = tmp_path / "nosd.pt"
    ck = good_ckpt()
    del ck["state_dict"]
    torch.save(ck, p)
    expect_error(p, "state_dict")


def test_wrong_shape(tmp_path):
    p = tmp_path / "shape.pt"
    ck = good_ckpt()
    key = "down.0.weight"
    ck["state_dict"][key] = torch.zeros(3, 3, 3, 3, 3)
    torch.save(ck, p)
    expect_error(p, key, "(3, 3, 3, 3, 3)")


def test_config_does_not_match_weights(tmp_path):
    p = tmp_path / "config.pt"
    ck = good_ckpt()
    ck["config"]["channels"] = [4, 8, 16]
    torch.save(ck, p)
    expect_error(p, "parameter")


def test_missing_key(tmp_path):
    p = tmp_path / "key.pt"
    ck = good_ckpt()
    del ck["state_dict"]["out.weight"]
    torch.save(ck, p)
    expect_error(p, "out.weight")


def test_unexpected_key(tmp_path):
    p = tmp_path / "extra.pt"
    ck = good_ckpt()
    ck["state_dict"]["extra.weight"] = torch.zeros(2)
    torch.save(ck, p)
    expect_error(p, "extra.weight")


def test_bad_config(tmp_path):
    p = tmp_path / "cfg.pt"
    ck = good_ckpt()
    ck["config"]["colour"] = "blue"
    torch.save(ck, p)
    expect_error(p, "config")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    p = tmp_path / "nan.pt"
    ck = good_ckpt()
    ck["state_dict"]["inp.weight"][0, 0, 1, 1, 1] = bad
    torch.save(ck, p)
    expect_error(p, "inp.weight", "NaN or Inf")


class Payload:
    """Unpickling this runs a shell command (creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "raw-pickle", "inside-checkpoint"])
def test_code_in_pickle_is_not_executed(tmp_path, how):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(Payload(marker), p)
    elif how == "raw-pickle":
        with open(p, "wb") as f:
            pickle.dump(Payload(marker), f, protocol=2)
    else:
        ck = good_ckpt()
        ck["meta"] = {"x": Payload(marker)}
        torch.save(ck, p)
    # the payload is real: plain pickle loading would run it
    if how == "raw-pickle":
        control = tmp_path / "control"
        pickle.loads(pickle.dumps(Payload(control)))
        assert control.exists()
    expect_error(p, "not a deepcd checkpoint")
    assert not marker.exists(), "loading the model file executed code"
    with pytest.raises(ModelFileError):
        read_checkpoint(str(p))
    assert not marker.exists()
