"""examples/baselines.py prints a table of converged baselines."""
import subprocess
import sys

from helpers import REPO, _env


def test_baselines_table():
    solvers = ["cg+jacobi", "cg+gamg", "cg+mg"]
    r = subprocess.run([sys.executable, str(REPO / "examples" / "baselines.py"),
                        "--scene", "smoke", "--n", "16", "--solvers", ",".join(solvers)],
                       capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [l for l in r.stdout.splitlines() if l.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert "solver" in header and "reason" in header
    assert len(body) == len(solvers), r.stdout
    for name, row in zip(solvers, body):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == name
        assert cells[2].startswith("CONVERGED"), row
        assert float(cells[3]) <= 1e-6, row  # true residual at the default rtol
