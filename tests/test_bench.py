"""`deepcd bench` on a tiny configuration, serially and on 2 ranks: every
solver converges, the JSON has the documented fields, the markdown table
and the plots are written."""
import json
import re

import pytest

from helpers import HAVE_MPIEXEC, run_cli, run_cli_mpi

from deepcd_petsc.bench import ALL_SOLVERS, unavailable_solvers

ROW_KEYS = {"scene", "n", "solver", "seed", "iterations", "reason", "setup_s", "solve_s",
            "total_s", "per_it_ms", "peak_mb", "true_residual", "repeats", "assembly_s"}
MACHINE_KEYS = {"cpu", "cores", "ranks", "torch_threads", "petsc", "petsc4py", "torch",
                "python", "date"}
BREAKDOWN = {"total", "network", "forward", "halo", "matmult", "orthogonalise", "other",
             "overhead"}


def check_report(out, ranks, solvers, sizes=(8,), scenes=("smoke",)):
    data = json.loads((out / "bench.json").read_text())
    assert MACHINE_KEYS <= set(data["machine"]), data["machine"]
    assert data["machine"]["ranks"] == ranks
    assert data["command"].startswith("mpiexec -n 2 deepcd bench" if ranks > 1 else "deepcd bench")
    rows = data["results"]
    # baselines this PETSc build lacks (cg+hypre without hypre) are listed, not run
    missing = unavailable_solvers(solvers)
    assert data["unavailable"] == missing
    solvers = [v for v in solvers if v not in missing]
    assert {(r["scene"], r["n"], r["solver"]) for r in rows} == \
        {(s, n, v) for s in scenes for n in sizes for v in solvers}
    for r in rows:
        assert ROW_KEYS <= set(r), (r["solver"], set(r) ^ ROW_KEYS)
        assert r["reason"].startswith("CONVERGED"), r
        assert r["true_residual"] <= 1e-6, r
        assert r["total_s"] == pytest.approx(r["setup_s"] + r["solve_s"])
        assert r["peak_mb"] > 0 and r["repeats"] == 1
        assert len(r["history"]) == r["iterations"] + 1
        if r["solver"] == "dcdm":
            assert BREAKDOWN <= set(r["breakdown_ms"]), r["breakdown_ms"]
            assert 0 < r["glue_pct"] < r["overhead_pct"] < 100
    md = (out / "bench.md").read_text()
    for v in solvers:
        assert re.search(rf"\| {re.escape(v)} +\|", md), (v, md)
    for v, why in missing.items():
        assert f"{v} ({why})" in md, md
    assert "DCDM cost per iteration" in md
    for s in scenes:
        for n in sizes:
            png = out / f"residuals_{s}_{n}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_every_solver(tmp_path):
    out = tmp_path / "b"
    r = run_cli(["bench", "--scenes", "smoke", "--sizes", "8", "--repeats", "2",
                 "--threads", "1", "--out", out])
    assert r.returncode == 0, r.stdout + r.stderr
    check_report(out, 1, ALL_SOLVERS)


@pytest.mark.skipif(not HAVE_MPIEXEC, reason="needs mpiexec")
def test_bench_two_ranks(tmp_path):
    out = tmp_path / "b2"
    solvers = ["dcdm", "fcg+net", "cg+icc", "cg+gamg"]   # icc: block Jacobi in parallel
    r = run_cli_mpi(2, ["bench", "--scenes", "smoke", "--sizes", "8", "--repeats", "2",
                        "--solvers", ",".join(solvers), "--threads", "1", "--out", out])
    assert r.returncode == 0, r.stdout + r.stderr
    check_report(out, 2, solvers)


def test_bench_unknown_solver(tmp_path):
    r = run_cli(["bench", "--solvers", "cg,bicgstab", "--out", tmp_path / "x"])
    assert r.returncode == 2
    assert "bicgstab" in r.stderr and "cg+gamg" in r.stderr, r.stderr
