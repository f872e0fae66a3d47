"""CPUs without AVX-512: oneDNN refuses bfloat16 convolutions there, so the
bf16 path must fall back. ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN (and torch's
bf16 check) behave as on such a CPU, whatever this machine has."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, _env
from deepcd_petsc import model
from deepcd_petsc.model import Conv3d

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def _avx2_env():
    env = _env()
    env.update(AVX2)
    return env


def test_fallback_matches_reference(monkeypatch):
    """The fallback conv (float32 arithmetic on bf16 operands) is as close to
    the float64 result as bf16 allows, with gradients, forced on here."""
    monkeypatch.setitem(model._BF16, "ok", False)
    torch.manual_seed(3)
    conv = Conv3d(4, 8, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 4, 6, 5, 7).to(torch.bfloat16).requires_grad_()
    y = conv(x)
    assert y.dtype == torch.bfloat16
    ref = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert ((y.double() - ref).norm() / ref.norm()) < 2e-2
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_bf16_check_follows_onednn_isa():
    code = "from deepcd_petsc.model import onednn_bf16; print(onednn_bf16())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_avx2_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_bf16_solve_without_avx512():
    """-ksp_dcdm_dtype bfloat16 on an AVX2-only CPU: a working solve."""
    cmd = [sys.executable, "-m", "deepcd_petsc", "solve", "--scene", "spheres", "--n", "16",
           "--json", "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
           "-ksp_dcdm_dtype", "bfloat16"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_avx2_env(), cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["converged"]


@pytest.mark.skipif(os.environ.get("DEEPCD_IN_AVX2_RUN") == "1", reason="already inside")
def test_bf16_tests_pass_without_avx512():
    """The suite's bf16 tests (they failed on an AVX2-only EPYC) under the
    AVX2 cap."""
    tests = ["tests/test_model.py::test_conv3d_float64_and_bf16",
             "tests/test_model.py::test_dtypes_agree_with_float32",
             "tests/test_mgnet.py::test_dtypes_agree_with_float64",
             "tests/test_examples.py::test_gpu_bench_script_runs_on_cpu"]
    env = _avx2_env()
    env["DEEPCD_IN_AVX2_RUN"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
