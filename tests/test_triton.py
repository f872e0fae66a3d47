"""The Triton kernels (the GPU twin of kernels.c's V-cycle) give the same
network output as the C kernels and the torch path. No GPU here: Triton's
interpreter runs them on CPU tensors, so this checks the indexing and the
arithmetic, not the speed (examples/gpu_bench.py on a GPU does that)."""
import json
import subprocess
import sys

from helpers import REPO, _env


def test_triton_kernels_equal_c_and_torch():
    r = subprocess.run([sys.executable, str(REPO / "tests" / "triton" / "check_triton.py"), "--all"],
                       capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(rows) == 2, r.stdout
    first, swept = rows
    assert first["levels"] == 3 and first["dense_bottom"]
    assert not swept["dense_bottom"] and swept["levels"] == 2
    for row in rows:
        assert row["nonzero"], row
        assert row["triton_vs_c"] < 1e-5 and row["triton_vs_torch"] < 1e-5, row
    assert first["into_done"] and first["into_finite"] and first["into_triton_vs_c"] < 1e-5, first
