"""The `deepcd` command line: solving, JSON output and one-line errors."""
import json
import re

import numpy as np
import pytest

from helpers import reference_matrix, run_cli, run_cli_mpi

SOLVE = ["solve", "--scene", "spheres", "--n", "16", "--seed", "7",
         "-ksp_type", "cg", "-pc_type", "gamg", "-ksp_rtol", "1e-6", "--json"]
KEYS = {"iterations", "reason", "true_residual", "setup_s", "solve_s", "ranks"}


def last_json(stdout):
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def check_converged(r, ranks):
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    res = last_json(r.stdout)
    assert KEYS <= set(res), res
    assert res["reason"] == "CONVERGED_RTOL"
    assert res["true_residual"] <= 1e-6
    assert res["iterations"] > 0
    assert res["setup_s"] >= 0 and res["solve_s"] >= 0
    assert res["ranks"] == ranks
    # JSON printed exactly once (by rank 0)
    assert sum(l.lstrip().startswith("{") for l in r.stdout.splitlines()) == 1
    return res


def test_solve_json():
    res = check_converged(run_cli(SOLVE), 1)
    assert res["shape"] == [16, 16, 16]


@pytest.mark.mpi
def test_solve_json_mpi():
    r = run_cli_mpi(2, SOLVE)
    check_converged(r, 2)
    assert r.stdout.count("iterations") == 2  # text report + JSON, once each


def test_solve_repeated_with_one_ksp():
    """--solves 3: the same KSP solves three times (its work vectors and
    network buffers reused), same iterations, the median reported."""
    r = run_cli(["solve", "--n", "16", "--seed", "3", "--solves", "3", "--json",
                 "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
                 "-ksp_rtol", "1e-6", "-ksp_converged_reason"])
    res = check_converged(r, 1)
    assert len(res["solve_times"]) == 3
    assert sorted(res["solve_times"])[1] == pytest.approx(res["solve_s"])
    its = re.findall(r"CONVERGED_RTOL iterations (\d+)", r.stdout)
    assert len(its) == 3 and len(set(its)) == 1, r.stdout
    assert "median of 3" in r.stdout
    bad = run_cli(["solve", "--n", "8", "--solves", "0"])
    assert bad.returncode == 2 and "--solves" in bad.stderr


def test_solve_non_cubic():
    r = run_cli(["solve", "--scene", "liquid", "--shape", "9,7,6", "--seed", "3",
                 "-ksp_rtol", "1e-6", "--json"])
    res = check_converged(r, 1)
    assert res["shape"] == [9, 7, 6]
    assert "9x7x6" in r.stdout


def test_info():
    r = run_cli(["info"])
    assert r.returncode == 0, r.stderr
    assert "PETSc" in r.stdout and "torch" in r.stdout
    assert "default model" in r.stdout and "V-cycle network" in r.stdout
    assert "CPU kernels" in r.stdout and "fused C kernels" in r.stdout, r.stdout
    assert "GPU kernels      Triton" in r.stdout, r.stdout     # installed with the test extras
    assert "Traceback" not in r.stderr


def test_save_solution(tmp_path):
    out = tmp_path / "x.npy"
    r = run_cli(["solve", "--scene", "smoke", "--shape", "9,7,6", "--seed", "2",
                 "-ksp_rtol", "1e-8", "--save-solution", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    x = np.load(out)
    assert x.shape == (6, 7, 9)
    assert np.isfinite(x).all() and np.abs(x).max() > 0


@pytest.mark.mpi
def test_save_solution_mpi_matches_serial(tmp_path):
    args = ["solve", "--scene", "spheres", "--shape", "10,9,8", "--seed", "4",
            "-ksp_rtol", "1e-10", "-pc_type", "gamg"]
    r1 = run_cli(args + ["--save-solution", str(tmp_path / "x1.npy")])
    r2 = run_cli_mpi(2, args + ["--save-solution", str(tmp_path / "x2.npy")])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    x1, x2 = np.load(tmp_path / "x1.npy"), np.load(tmp_path / "x2.npy")
    assert x1.shape == x2.shape == (8, 9, 10)
    assert np.linalg.norm(x1 - x2) <= 1e-6 * np.linalg.norm(x1)


def test_flags_and_rhs_files(tmp_path):
    """--flags/--rhs/--open: the saved solution solves the reference system."""
    from deepcd_petsc.scenes import make_flags
    nz, ny, nx = 6, 5, 7
    rng = np.random.default_rng(0)
    raw = rng.choice(np.array([0, 1, 2], np.int8), size=(nz, ny, nx), p=[0.7, 0.2, 0.1])
    rhs = rng.normal(size=(nz, ny, nx))
    np.save(tmp_path / "f.npy", raw)
    np.save(tmp_path / "b.npy", rhs)
    r = run_cli(["solve", "--flags", tmp_path / "f.npy", "--rhs", tmp_path / "b.npy",
                 "--shape", f"{nx},{ny},{nz}", "--open", "z+", "-ksp_rtol", "1e-10",
                 "--save-solution", tmp_path / "x.npy", "--json"])
    res = check_converged(r, 1)
    assert res["shape"] == [nx, ny, nz]
    x = np.load(tmp_path / "x.npy").ravel()
    flags, faces = make_flags("file", (nz, ny, nx), flags_file=str(tmp_path / "f.npy"),
                              open_faces={"z+"})
    A = reference_matrix(flags, faces)
    b = np.where(flags == 0, rhs, 0.0).ravel()
    assert np.linalg.norm(A @ x - b) <= 1e-8 * np.linalg.norm(b)


def test_flags_file_infers_shape(tmp_path):
    flags = np.zeros((6, 5, 7), np.int8)
    flags[0] = 1
    np.save(tmp_path / "f.npy", flags)
    r = run_cli(["solve", "--flags", tmp_path / "f.npy", "--json"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert last_json(r.stdout)["shape"] == [7, 5, 6]


# --------------------------------------------------------------- bad input

def _bad_files(tmp_path):
    def save(name, arr):
        p = tmp_path / name
        np.save(p, arr)
        return str(p)
    f5 = np.zeros((8, 8, 8), np.int8)
    f5[1, 2, 3] = 5
    return {
        "ok": save("ok.npy", np.zeros((8, 8, 8), np.int8)),
        "float": save("float.npy", np.zeros((8, 8, 8))),
        "five": save("five.npy", f5),
        "solid": save("solid.npy", np.ones((8, 8, 8), np.int8)),
        "rhs_small": save("rhs_small.npy", np.zeros((8, 8, 7))),
        "missing": str(tmp_path / "does_not_exist.npy"),
    }


BAD = {
    "n3": ["--n", "3"],
    "n_abc": ["--n", "abc"],
    "shape_1d": ["--shape", "8"],
    "dim2_shape3": ["--dim", "2", "--shape", "8,8,8"],
    "scene_nope": ["--scene", "nope", "--n", "8"],
    "flags_wrong_shape": ["--flags", "{ok}", "--n", "9"],
    "flags_float": ["--flags", "{float}", "--n", "8"],
    "flags_value_5": ["--flags", "{five}", "--n", "8"],
    "flags_all_solid": ["--flags", "{solid}", "--n", "8"],
    "rhs_wrong_size": ["--n", "8", "--rhs", "{rhs_small}"],
    "rhs_missing": ["--n", "8", "--rhs", "{missing}"],
    "ksp_type": ["--n", "8", "-ksp_type", "nosuchksp"],
    "pc_type": ["--n", "8", "-pc_type", "nosuchpc"],
    "ksp_rtol": ["--n", "8", "-ksp_rtol", "abc"],
    "flags_missing": ["--flags", "{missing}", "--n", "8"],
    "seed_abc": ["--n", "8", "--seed", "abc"],
    "open_bogus": ["--n", "8", "--open", "bogus"],
    "file_without_flags": ["--scene", "file", "--n", "8"],
    "unknown_option": ["--n", "8", "--bogus"],
}


def check_one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    err = [l for l in r.stderr.splitlines() if l.strip()]
    mine = [l for l in err if l.startswith("deepcd: error:")]
    assert len(mine) == 1, r.stderr
    assert len(mine[0]) > len("deepcd: error: ")
    return err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(tmp_path, case):
    files = _bad_files(tmp_path)
    args = ["solve"] + [a.format(**files) for a in BAD[case]]
    r = run_cli(args)
    err = check_one_line_error(r)
    assert len(err) == 1, r.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["n3", "rhs_wrong_size", "ksp_type"])
def test_bad_input_mpi_reports_once(tmp_path, case):
    files = _bad_files(tmp_path)
    args = ["solve"] + [a.format(**files) for a in BAD[case]]
    r = run_cli_mpi(2, args)
    check_one_line_error(r)  # mpiexec adds its own banner; ours appears once


def test_not_converged_exits_1():
    r = run_cli(["solve", "--n", "8", "-ksp_max_it", "1", "--json"])
    assert r.returncode == 1, r.stderr
    assert last_json(r.stdout)["reason"] == "DIVERGED_MAX_IT"
    assert "Traceback" not in r.stderr


def test_missing_flags_file_without_n_names_the_file(tmp_path):
    r = run_cli(["solve", "--flags", tmp_path / "nope.npy"])
    check_one_line_error(r)
    assert "nope.npy" in r.stderr


def test_save_solution_bad_path(tmp_path):
    r = run_cli(["solve", "--n", "8", "--save-solution", tmp_path / "no" / "x.npy"])
    check_one_line_error(r)


def test_rhs_in_null_space_is_reported(tmp_path):
    import numpy as np
    np.save(tmp_path / "c.npy", np.ones((8, 8, 8)))
    r = run_cli(["solve", "--scene", "box", "--n", "8", "--rhs", tmp_path / "c.npy"])
    check_one_line_error(r)
    assert "null space" in r.stderr


def test_flags_with_generated_scene_is_refused(tmp_path):
    import numpy as np
    np.save(tmp_path / "f.npy", np.zeros((8, 8, 8), np.int8))
    r = run_cli(["solve", "--scene", "smoke", "--flags", tmp_path / "f.npy"])
    check_one_line_error(r)
    assert "--scene file" in r.stderr


def test_every_option_has_a_help_line():
    """Issue 17: `deepcd <command> --help` explains every option."""
    import argparse
    from deepcd_petsc.cli import build_parser
    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(cmd, opt.option_strings) for cmd, p in subs.choices.items()
               for opt in p._actions
               if opt.option_strings and not isinstance(opt, argparse._HelpAction)
               and not (opt.help or "").strip()]
    assert not missing, missing
    assert {"solve", "bench", "train", "evaluate", "kernels", "info"} <= set(subs.choices)
    r = run_cli(["bench", "--help"])
    assert r.returncode == 0 and "--change-every" in r.stdout and "--solves" in r.stdout, r.stdout
