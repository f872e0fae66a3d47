"""The measurement tools README's numbers come from: they run and report
consistent figures (tiny grids here)."""
import re
import subprocess
import sys

from helpers import REPO, _env


def _run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_dcdm_split_reports_the_median_split():
    out = _run(REPO / "tools" / "dcdm_split.py", "--n", "16", "--solves", "4",
               "-ksp_dcdm_northo", "1")
    m = re.search(r"(\d+) iterations, median of 2 solves \(ms per iteration\): total ([\d.]+), "
                  r"forward ([\d.]+), matmult ([\d.]+), orthogonalise ([\d.]+), other ([\d.]+)", out)
    assert m, out
    total, parts = float(m[2]), [float(v) for v in m.groups()[2:]]
    assert 0 < int(m[1]) < 30 and all(v >= 0 for v in parts) and total > 0
    o = re.search(r"overhead .*?median ([\d.]+)% .*without the A-orthogonalisation and its dot products: ([\d.]+)%", out)
    assert o and 0 < float(o[2]) < float(o[1]) < 100, out


def test_dcdm_split_refuses_too_few_solves():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "dcdm_split.py"), "--solves", "3"],
                       capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert r.returncode != 0 and "--solves must be >= 4" in r.stderr


def test_vector_traffic_times_every_m_hot_and_cold():
    out = _run(REPO / "tools" / "vector_traffic.py", "--n", "16", "--repeats", "3")
    rows = re.findall(r"^(\d)  (hot|cold)\s+([\d.]+)  ([\d.]+)  ([\d.]+)  ([\d.]+)$", out, re.M)
    assert [(m, s) for m, s, *_ in rows] == [(m, s) for m in "012" for s in ("hot", "cold")], out
    for _, _, *t in rows:
        dots, orth, step, total = map(float, t)
        assert abs(dots + orth + step - total) < 2e-3 and orth > 0 and step > 0


def test_make_card_writes_a_table_per_family(tmp_path):
    card = tmp_path / "card.md"
    _run(REPO / "tools" / "make_card.py", REPO / "deepcd_petsc" / "models" / "default.pt", card,
         "deepcd train ...", "--sizes", "16", "--big", "", "--families", "density,perm",
         "--family-n", "16", "--family-seeds", "1,2", "--family-big", "24")
    text = card.read_text()
    assert "## Operator families" in text and "`deepcd train ...`" in text
    rows = re.findall(r"^\| (density|perm) +\| (\d+)³ +\| (\d) +\| (\d+) +\| (\S+) +\|", text, re.M)
    assert [(f, g, s) for f, g, s, _, _ in rows] == [
        ("density", "16", "1"), ("density", "16", "2"), ("density", "24", "1"),
        ("perm", "16", "1"), ("perm", "16", "2"), ("perm", "24", "1")]
    for f, g, s, its, gamg in rows:
        assert 0 < int(its) < 40
        assert (gamg == "–") == (g == "24")
