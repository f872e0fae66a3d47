"""The torch DCDM / CG yardstick, the shipped model, and the `deepcd train`
and `deepcd evaluate` commands (outputs and one-line errors)."""
import json
import os

import numpy as np
import pytest
import torch

from deepcd_petsc.evaluate import TorchSystem, cg, dcdm
from deepcd_petsc.model import DCDMNet, default_model_path, dirichlet_fraction, load_model
from deepcd_petsc.scenes import FLUID
from helpers import run_cli




# --------------------------------------------------------- torch solvers
def test_torch_system():
    s = TorchSystem("liquid", (10, 9, 8), seed=2)
    assert s.flags.shape == (8, 9, 10)
    assert s.b.shape == (8, 9, 10) and s.b.dtype == torch.float64
    assert (s.b[torch.from_numpy(s.flags != FLUID)] == 0).all()
    assert s.b.norm() > 0
    box = TorchSystem("box", (6, 6, 6), seed=1)
    assert len(box.null) == 1
    assert abs(box.b.sum().item()) < 1e-10 * box.b.abs().sum().item()


@pytest.mark.parametrize("jacobi", [False, True])
def test_cg_converges(jacobi):
    s = TorchSystem("spheres", (10, 10, 10), seed=3)
    its, hist = cg(s, rtol=1e-8, jacobi=jacobi)
    assert hist[-1] <= 1e-8 and len(hist) == its + 1
    assert 0 < its < int((s.flags == FLUID).sum())


def test_dcdm_untrained_net_runs():
    torch.manual_seed(0)
    net = DCDMNet(channels=[4, 8]).eval()
    s = TorchSystem("smoke", (8, 8, 8), seed=1)
    geo = net.prepare(s.flags, dirichlet_fraction(s.flags, s.faces))
    its, hist = dcdm(s, net, geo, maxit=20, northo=20)
    assert 0 < its <= 20 and len(hist) == its + 1
    assert all(np.isfinite(hist))
    # A-orthogonalised steps never increase the A-norm error, and on this
    # small system 20 directions make real progress
    assert hist[-1] < 1.0


def test_default_model_beats_cg():
    """The shipped model on a held-out 32³ scene with the paper's m = 2:
    a few iterations, far fewer than CG, and training mattered (the
    untrained V-cycle network needs more than twice as many)."""
    from deepcd_petsc.mgnet import MGNet
    path = default_model_path()
    assert os.path.exists(path)
    net, ck = load_model()
    assert net.n_params() > 0 and not net.training
    assert ck["meta"].get("steps", 0) > 0
    s = TorchSystem("spheres", (32, 32, 32), seed=5)
    with torch.inference_mode():
        geo = net.prepare(s.flags, dirichlet_fraction(s.flags, s.faces))
    its, hist = dcdm(s, net, geo, rtol=1e-6)
    cg_its, cg_hist = cg(s, rtol=1e-6)
    assert cg_hist[-1] <= 1e-6
    assert hist[-1] <= 1e-6, f"DCDM did not reach 1e-6 in {its} iterations (final {hist[-1]:.2e})"
    assert its <= 10 and 10 * its < cg_its, f"DCDM {its} iterations, CG {cg_its}"
    init = MGNet().eval()
    with torch.inference_mode():
        its0, _ = dcdm(s, init, init.prepare(s.flags, dirichlet_fraction(s.flags, s.faces)))
    assert 2 * its < its0, f"trained {its}, untrained {its0}"


def test_default_model_file_readable():
    """The shipped model must be readable by every user of an installation."""
    mode = os.stat(default_model_path()).st_mode & 0o777
    assert mode & 0o444 == 0o444, oct(mode)


# ---------------------------------------------------------------- CLI
def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("deepcd: error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = d / "m.pt"
    r = run_cli(["train", "--out", out, "--n", "12", "--scenes", "spheres", "--geometries", "1",
                 "--lanczos", "40", "--steps", "15", "--batch", "2",
                 "--eval-sizes", "12", "--threads", "1"])
    return d, out, r


def test_cli_train_outputs(trained):
    d, out, r = trained
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(d)) == ["m.md", "m.png", "m.pt", "m.pt.state"]
    with open(d / "m.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    card = (d / "m.md").read_text()
    assert "Reproduce" in card
    table = [l for l in card.splitlines() if l.startswith("|")]
    assert len(table) >= 3 and set(table[1]) <= set("|-")
    assert table[0].count("|") == table[2].count("|")
    assert all(s in card for s in ("spheres", "smoke", "liquid"))
    assert "--n 12" in card
    net, ck = load_model(str(out))
    assert ck["config"]["arch"] == "vcycle"
    assert ck["meta"]["steps"] == 15 and len(ck["meta"]["losses"]) == 15
    assert ck["meta"]["threads"] == 1
    assert f"receptive field {net.receptive_field(net.levels_for((12, 12, 12)))}" in card
    assert str(out) in r.stdout


def test_cli_evaluate_json(trained):
    d, out, _ = trained
    r = run_cli(["evaluate", "--model", out, "--sizes", "12", "--seeds", "1",
                 "--scenes", "spheres", "--json", "--threads", "1"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert {"scene", "n", "seed", "dcdm", "cg", "cg_jacobi", "dcdm_s"} <= set(row)
    assert (row["scene"], row["n"], row["seed"]) == ("spheres", 12, 1)
    assert isinstance(row["cg"], int) and row["cg"] > 0
    assert isinstance(row["dcdm"], int) or str(row["dcdm"]).startswith(">")
    assert "| spheres" in r.stdout  # the markdown table


def test_cli_evaluate_missing_model(tmp_path):
    p = tmp_path / "nothere.pt"
    assert_one_line_error(run_cli(["evaluate", "--model", p, "--sizes", "8"]), "nothere.pt")


@pytest.mark.parametrize("content", [b"\x00\x01garbage" * 30, b"", b"hello\n"],
                         ids=["binary", "empty", "text"])
def test_cli_evaluate_corrupt_model(tmp_path, content):
    p = tmp_path / "corrupt.pt"
    p.write_bytes(content)
    assert_one_line_error(run_cli(["evaluate", "--model", p, "--sizes", "8"]), "corrupt.pt")


def test_cli_evaluate_bad_sizes():
    assert_one_line_error(run_cli(["evaluate", "--sizes", "abc"]), "--sizes", "abc")


def test_cli_evaluate_kcycle_2d():
    """evaluate runs DCDM's default on 2D grids (the K-cycle on the finest
    level); --kcycle 0 is the V-cycle, which needs more iterations here."""
    its = {}
    for k in (None, 0):
        r = run_cli(["evaluate", "--dim", "2", "--sizes", "256", "--seeds", "3", "--scenes", "liquid",
                     "--no-baselines", "--json", "--threads", "1"] + ([] if k is None else ["--kcycle", str(k)]))
        assert r.returncode == 0, r.stdout + r.stderr
        its[k] = json.loads(r.stdout.strip().splitlines()[-1])[0]["dcdm"]
    assert isinstance(its[None], int) and isinstance(its[0], int) and its[None] < its[0], its
    assert_one_line_error(run_cli(["evaluate", "--sizes", "8", "--kcycle", "-1"]), "--kcycle")


def test_cli_evaluate_bad_scene():
    assert_one_line_error(run_cli(["evaluate", "--sizes", "8", "--scenes", "nope"]), "nope")


def test_cli_train_cuda_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "m.pt"
    r = run_cli(["train", "--out", out, "--n", "8", "--steps", "2", "--device", "cuda"])
    assert_one_line_error(r, "cuda")
    assert not out.exists()


def test_cli_train_resume_without_state(tmp_path):
    out = tmp_path / "m.pt"
    r = run_cli(["train", "--out", out, "--n", "8", "--steps", "2", "--resume"])
    assert_one_line_error(r, "m.pt")
    assert not out.exists()


def test_cli_evaluate_bfloat16(trained):
    """--dtype bfloat16 is offered by the CLI, so it must run."""
    _, out, _ = trained
    r = run_cli(["evaluate", "--model", out, "--sizes", "8", "--seeds", "1", "--scenes", "spheres",
                 "--dtype", "bfloat16", "--maxit", "20", "--no-baselines", "--json"])
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])[0]["scene"] == "spheres"


def test_cli_train_unet_arch(tmp_path):
    out = tmp_path / "u.pt"
    r = run_cli(["train", "--out", out, "--arch", "unet", "--channels", "4,8", "--n", "12",
                 "--scenes", "smoke", "--geometries", "1", "--lanczos", "30", "--steps", "3",
                 "--batch", "2", "--threads", "1", "--no-card"])
    assert r.returncode == 0, r.stdout + r.stderr
    net, ck = load_model(str(out))
    assert ck["config"]["channels"] == [4, 8] and isinstance(net, DCDMNet)
    bad = run_cli(["train", "--out", tmp_path / "v.pt", "--channels", "4,8", "--steps", "1"])
    assert bad.returncode == 2 and "--arch unet" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_train_2d_and_3d_then_evaluate_2d(tmp_path):
    """One model trained on N³ and N² grids (--n2d); the card lists both
    and evaluates both; `evaluate --dim 2` solves the scenes' 2D versions
    with the flags' unit stencil, as DCDM does on a 2D DMDA."""
    out = tmp_path / "m2.pt"
    r = run_cli(["train", "--out", out, "--n", "8", "--n2d", "24", "--scenes", "spheres,density",
                 "--geometries", "1", "--lanczos", "30", "--steps", "6", "--batch", "2",
                 "--eval-sizes", "8", "--eval-sizes-2d", "24", "--threads", "1"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(3D) and [24] (2D)" in r.stdout
    net, ck = load_model(str(out))
    assert ck["meta"]["n"] == 8 and ck["meta"]["n2d"] == [24]
    card = (tmp_path / "m2.md").read_text()
    assert "[24] (N², the scenes' 2D versions)" in card
    rows = [l for l in card.splitlines() if l.startswith("| ")]
    import re
    assert any(re.search(r"\| 24² +\|", l) for l in rows) and any(re.search(r"\| 8³ +\|", l) for l in rows), card
    assert f"24²: {net.levels_for((1, 24, 24))} levels" in card
    # a 2D-only model
    r = run_cli(["train", "--out", tmp_path / "m3.pt", "--n", "", "--n2d", "16", "--scenes", "box",
                 "--geometries", "1", "--lanczos", "20", "--steps", "2", "--batch", "2", "--no-card"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert load_model(str(tmp_path / "m3.pt"))[1]["meta"]["n"] is None
    r = run_cli(["evaluate", "--dim", "2", "--sizes", "48", "--seeds", "2", "--scenes", "liquid,aniso",
                 "--json", "--threads", "1"])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(x["scene"], x["grid"], x["dim"]) for x in got] == [("liquid", "48²", 2), ("aniso", "48²", 2)]
    for x in got:      # the shipped model on 2D: far fewer iterations than CG+Jacobi
        assert isinstance(x["dcdm"], int) and 4 * x["dcdm"] < x["cg_jacobi"], x


def test_scene_operator_2d_is_the_flags_unit_stencil():
    """What training and evaluate see on a 2D grid is what DCDM builds
    from a 2D DMDA's flags (context._flat_stencil)."""
    import numpy as np
    from deepcd_petsc.coefficients import scene_operator
    from deepcd_petsc.scenes import padded
    from deepcd_petsc.stencil import from_flags
    flags, faces, st = scene_operator("liquid", (1, 20, 28), 3)
    assert st is not None and flags.shape == (1, 20, 28)
    ref = from_flags(flags, padded(flags, faces))
    assert np.array_equal(st.packed(), ref.packed())
    assert st.coef[:2].max() == 0 and st.coef[2:].max() == 1     # no z couplings in 2D
    assert scene_operator("liquid", (12, 20, 28), 3)[2] is None  # 3D flags: the compact path
