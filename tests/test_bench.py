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


# -- issue 17: tuned baselines, repeated solves, DCDM against the best classical solver

TUNED = ["cg+gamg-tuned", "cg+hypre-tuned", "cg+mg-tuned"]


def bench_json(tmp_path, args):
    out = tmp_path / "b"
    r = run_cli(["bench", "--scenes", "spheres", "--sizes", "16", "--repeats", "1",
                 "--threads", "1", "--out", out, *args])
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def check_best(data, metrics):
    """The ratio table: per metric the fastest converged classical row,
    DCDM's time and their ratio, as the rows themselves say."""
    from deepcd_petsc.solvers import BASELINES
    rows = data["results"]
    classical = [r for r in rows if r["solver"] in BASELINES and r["converged"]]
    dcdm = next(r for r in rows if r["solver"] == "dcdm")
    best = data["best_classical"]
    assert len(best) == len(metrics), best
    for e, key in zip(best, metrics):
        fastest = min(classical, key=lambda r: r[key])
        assert e["best_classical"] == fastest["solver"] and e["best_s"] == fastest[key]
        assert e["dcdm_s"] == dcdm[key]
        assert e["dcdm_over_best"] == pytest.approx(dcdm[key] / fastest[key])
        assert e["speedup"] == pytest.approx(1 / e["dcdm_over_best"])


def test_tuned_baselines_converge_and_best_classical_ratio(tmp_path):
    data, md = bench_json(tmp_path, ["--solvers", ",".join(["dcdm", "cg+gamg"] + TUNED)])
    missing = unavailable_solvers(TUNED)
    ran = {r["solver"]: r for r in data["results"]}
    assert set(ran) == {"dcdm", "cg+gamg"} | (set(TUNED) - set(missing))
    for name, r in ran.items():
        assert r["converged"] and r["true_residual"] <= 1e-6, (name, r)
    for name in set(TUNED) & set(ran):
        assert ran[name]["pc_type"] == name[3:].split("-")[0], ran[name]
    check_best(data, ["total_s"])
    assert "DCDM against the fastest classical solver" in md and "set-up + solve" in md


def test_repeated_solves_reuse_the_setup(tmp_path):
    """--solves 3: one KSP, three right-hand sides; only the first solve
    sets up a PC (PETSc's PCSetUp events), later set-up calls cost ~0."""
    data, md = bench_json(tmp_path, ["--solvers", "dcdm,cg+gamg,cg+gamg-tuned,cg+mg-tuned",
                                     "--solves", "3"])
    for r in data["results"]:
        assert r["solves"] == 3 and r["converged"] and r["true_residual"] <= 1e-6, r
        assert r["pc_setups"][0] > 0 and r["pc_setups"][1:] == [0, 0], r
        assert r["setups"] == 1
        assert r["reuse_setup_s"] < max(0.2 * r["first_setup_s"], 2e-3), r
        assert r["first_s"] == pytest.approx(r["setup_times"][0] + r["solve_times"][0])
        assert r["median_s"] == pytest.approx(sorted(r["solve_times"][1:])[0] / 2
                                              + sorted(r["solve_times"][1:])[1] / 2)
        assert r["amortised_s"] == pytest.approx((sum(r["setup_times"]) + sum(r["solve_times"])) / 3)
    check_best(data, ["median_s", "amortised_s"])
    assert "1st total (s)" in md and "per solve (median of the rest)" in md


def test_change_every_redoes_the_setup(tmp_path):
    """--change-every 2: a new geometry at solves 0 and 2, set up there
    and solved well (PCMG smoothing the old operator took 5x the
    iterations), reused at 1 and 3."""
    data, md = bench_json(tmp_path, ["--solvers", "dcdm,cg+hypre,cg+mg", "--solves", "4",
                                     "--change-every", "2"])
    for r in data["results"]:
        assert r["change_every"] == 2 and r["converged"], r
        assert [p > 0 for p in r["pc_setups"]] == [True, False, True, False], r
        assert r["setups"] == 2
        its = r["iteration_counts"]
        assert its[2] <= 2 * its[0] + 2, r
        assert r["amortised_s"] == pytest.approx((sum(r["setup_times"]) + sum(r["solve_times"])) / 4)
    assert "a new geometry every 2 solves" in md


@pytest.mark.parametrize("args, what", [
    (["--solves", "0"], "--solves must be >= 1, got 0"),
    (["--solves", "3", "--change-every", "3"], "--change-every must be >= 1 and below --solves (3)"),
    (["--solves", "3", "--change-every", "0"], "--change-every must be >= 1"),
    (["--solvers", "dcdm,cg+amg"], "unknown solver(s) ['cg+amg']"),
])
def test_bench_bad_repeat_options(tmp_path, args, what):
    r = run_cli(["bench", "--sizes", "8", "--out", tmp_path / "x", *args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("interrupt_in", ["cg+jacobi", "dcdm"])
def test_interrupted_bench_keeps_its_finished_rows(tmp_path, interrupt_in):
    """Ctrl-C in the middle of a solve (PETSc's C CG, or DCDM's Python
    iteration, whence it reaches the CLI as a PETSc.Error): exit 130, and
    bench.json / bench.md hold the rows finished before it."""
    import signal
    import subprocess
    import sys
    from helpers import REPO, _env, sigint_default
    prefix = "-bench_" + interrupt_in.replace("+", "_") + "_"
    cmd = [sys.executable, "-m", "deepcd_petsc", "bench", "--scenes", "spheres", "--sizes", "12,128",
           "--solvers", interrupt_in, "--repeats", "1", "--rtol", "1e-12", "--out", str(tmp_path),
           prefix + "ksp_monitor"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         cwd=REPO, preexec_fn=sigint_default)
    lines, row = [], False
    for line in p.stdout:
        lines.append(line)
        row = row or " 12^3 " in line
        if row and "3 KSP Residual norm" in line:   # the 128³ solve's third iteration
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, "".join(lines) + out + err
    assert "interrupted: kept the 1 finished row(s)" in err and "Traceback" not in err, err
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["interrupted"] is True
    assert [(r["n"], r["solver"]) for r in data["results"]] == [(12, interrupt_in)]
    assert "Interrupted" in (tmp_path / "bench.md").read_text()
