"""glibc allocator tuning for the network's large temporaries."""
import subprocess
import sys

CODE = "from deepcd_petsc.memory import tune_malloc; print(tune_malloc(), tune_malloc())"


def run(env_value=None):
    import os
    env = dict(os.environ)
    env.pop("DEEPCD_MALLOPT", None)
    if env_value is not None:
        env["DEEPCD_MALLOPT"] = env_value
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          env=env, timeout=60)


def test_applied_once_on_glibc():
    r = run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def test_opt_out():
    r = run("0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
