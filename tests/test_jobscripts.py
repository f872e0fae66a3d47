"""Jobscripts are valid shell and launch the right command: each runs with a
stub srun/mpirun first on PATH that records its arguments."""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "jobscripts")
SCRIPTS = ["slurm/cpu.sbatch", "slurm/gpu.sbatch", "pbs/cpu.pbs", "pbs/gpu.pbs"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_valid_shell(script):
    r = subprocess.run(["bash", "-n", os.path.join(JOBS, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def launch(tmp_path, script, **env):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    log = tmp_path / "args.txt"
    for name in ("srun", "mpirun"):
        stub = stub_dir / name
        stub.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{log}"\n'
                        f'echo "{name}" > "{tmp_path}/launcher.txt"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\nn2\n")
    e = {"PATH": f"{stub_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "PBS_NODEFILE": str(nodefile)}
    e.update(env)
    r = subprocess.run(["bash", os.path.join(JOBS, script)], capture_output=True, text=True, env=e,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the CPU kernels are built (into this HOME's cache) before the launch
    assert "deepcd CPU kernels: fused C kernels" in r.stdout, r.stdout + r.stderr
    return log.read_text().split("\n")[:-1], (tmp_path / "launcher.txt").read_text().strip()


def opt(args, name):
    return args[args.index(name) + 1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_deepcd_command(tmp_path, script):
    args, launcher = launch(tmp_path, script, N="96", THREADS="3", SLURM_CPUS_PER_TASK="3",
                            MODEL="/models/m.pt", LEVELS="5")
    assert launcher == ("srun" if "slurm" in script else "mpirun")
    i = args.index("deepcd")
    assert args[i + 1] == "solve" and opt(args, "--n") == "96"
    assert opt(args, "-ksp_type") == "python"
    assert opt(args, "-ksp_python_type") == "deepcd_petsc.DCDM"
    assert opt(args, "-ksp_dcdm_threads") == "3"
    assert opt(args, "-ksp_dcdm_model") == "/models/m.pt"
    assert opt(args, "-ksp_dcdm_levels") == "5"
    if "gpu" in script:
        assert opt(args, "-ksp_dcdm_device") == "cuda"
    else:
        assert "-ksp_dcdm_device" not in args
    if "pbs" in script:
        ranks = 4 if "gpu" in script else 8
        assert opt(args, "-np") == str(2 * ranks)          # 2 nodes in PBS_NODEFILE
        assert opt(args, "--map-by") == f"ppr:{ranks}:node:PE=3"


@pytest.mark.parametrize("script", SCRIPTS)
def test_c_example_command(tmp_path, script):
    args, _ = launch(tmp_path, script, APP="c", N="64", THREADS="2")
    exe = [a for a in args if a.endswith("examples/c/poisson3d")]
    assert exe, args
    assert "-python" in args and opt(args, "-ksp_python_type") == "deepcd_petsc.DCDM"
    assert opt(args, "-n") == "64" and "-ksp_dcdm_model" not in args
