"""A library planted in the kernel cache never runs (kernels.py's trust
checks): each case puts a library whose constructor writes a marker file
under exactly the name load() looks for, loads the kernels in a fresh
process, and checks that the marker is absent, that status() names the
refused file or directory and why, and that the real kernels were built in
the private per-user cache instead. Then the safe way to share them
(`deepcd kernels --install DIR`), and a solve beside a planted library."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, _env

from deepcd_petsc import kernels

NOBODY = 65534
PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
"""
LOAD = "from deepcd_petsc import kernels; kernels.load(); print(kernels.status())"


def _python(args, home, kernel_dir=None, **extra):
    """`python *args` in a fresh process whose private cache lies under `home`."""
    env = _env()
    env.pop("DEEPCD_KERNELS", None)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **extra)
    if kernel_dir is not None:
        env["DEEPCD_KERNEL_DIR"] = str(kernel_dir)
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def planted(tmp_path):
    """(library bytes, marker path): a library whose constructor writes the
    marker; checked to do so when loaded, so an absent marker means it never ran."""
    marker = tmp_path / "marker"
    src, lib = tmp_path / "planted.c", tmp_path / "planted.so"
    src.write_text(PLANTED_C)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", lib, src], check=True)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"], check=True)
    assert marker.exists()       # the control: loading it does run it
    marker.unlink()
    return lib.read_bytes(), marker


def _plant(path, data, mode=0o644, record=True, owner=None):
    """The planted bytes at `path` with a record that matches them (so only
    the ownership and mode checks can refuse them), optionally chowned."""
    path.write_bytes(data)
    rec = kernels.record_path(path)
    if record:
        rec.write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    for p in (path, rec) if record else (path,):
        os.chmod(p, mode)
        if owner is not None:
            os.chown(p, owner, owner)


def _check_refused(status, marker, home, named, reason):
    private = home / ".cache" / "deepcd_petsc"
    assert not marker.exists(), "the planted library ran"
    assert status.startswith(f"fused C kernels ({private}/deepcd_kernels-"), status
    assert f"{named} not trusted (" in status and reason in status, status
    assert f"built in {private}" in status, status
    assert (private / kernels.library_name()).is_file()


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("chown to nobody needs root")


def _dir(tmp_path, mode=0o755):
    d = tmp_path / "cache"
    d.mkdir()
    os.chmod(d, mode)
    return d


def test_world_writable_directory_and_foreign_file(tmp_path, planted):
    data, marker = planted
    d = _dir(tmp_path, 0o777)
    _plant(kernels.library_path(d), data, 0o666, owner=NOBODY if os.geteuid() == 0 else None)
    status = _python(["-c", LOAD], tmp_path, d).strip()
    _check_refused(status, marker, tmp_path, f"kernel cache {d}", "writable by others")


def test_world_writable_ancestor(tmp_path, planted):
    data, marker = planted
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)                   # no sticky bit: anyone may rename cache/ away
    d = parent / "cache"
    d.mkdir()
    _plant(kernels.library_path(d), data)
    status = _python(["-c", LOAD], tmp_path, d).strip()
    _check_refused(status, marker, tmp_path, f"kernel cache {d}",
                   f"ancestor {parent} writable by group; writable by others")


def test_file_owned_by_another_user(tmp_path, planted):
    _need_root()
    data, marker = planted
    d = _dir(tmp_path)
    lib = kernels.library_path(d)
    _plant(lib, data, owner=NOBODY)
    status = _python(["-c", LOAD], tmp_path, d).strip()
    _check_refused(status, marker, tmp_path, f"kernel library {lib}", f"owned by uid {NOBODY}")


def test_group_and_world_writable_file(tmp_path, planted):
    data, marker = planted
    d = _dir(tmp_path)
    lib = kernels.library_path(d)
    _plant(lib, data, 0o666)
    status = _python(["-c", LOAD], tmp_path, d).strip()
    _check_refused(status, marker, tmp_path, f"kernel library {lib}",
                   "writable by group; writable by others")


@pytest.mark.parametrize("record", ["wrong", "missing"])
def test_record_does_not_match(tmp_path, planted, record):
    data, marker = planted
    d = _dir(tmp_path)
    lib = kernels.library_path(d)
    _plant(lib, data, record=record == "wrong")
    if record == "wrong":
        kernels.record_path(lib).write_text(f"{'0' * 64}  {lib.name}\n")
    status = _python(["-c", LOAD], tmp_path, d).strip()
    reason = (f"content does not match {lib.name}.sha256" if record == "wrong"
              else f"no record {lib.name}.sha256")
    _check_refused(status, marker, tmp_path, f"kernel library {lib}", reason)


def test_symbolic_link(tmp_path, planted):
    data, marker = planted
    d = _dir(tmp_path)
    lib = kernels.library_path(d)
    target = tmp_path / "elsewhere.so"
    _plant(target, data)
    lib.symlink_to(target)
    kernels.record_path(target).rename(kernels.record_path(lib))   # a matching record too
    status = _python(["-c", LOAD], tmp_path, d).strip()
    _check_refused(status, marker, tmp_path, f"kernel library {lib}", "a symbolic link")


def test_install_then_load_without_compiling(tmp_path):
    """`deepcd kernels --install DIR`: DIR 0755 with the library and record
    0644; jobs then load DIR's file, and the compiler (a wrapper that logs
    its calls) is only asked for its version."""
    log = tmp_path / "cc.log"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec cc "$@"\n')
    cc.chmod(0o755)
    dest = tmp_path / "site" / "kernels"
    out = _python(["-m", "deepcd_petsc", "kernels", "--install", dest], tmp_path / "admin",
                  CC=str(cc))
    assert out.strip().splitlines()[-1] == f"export DEEPCD_KERNEL_DIR={dest}", out
    libs = list(dest.glob("deepcd_kernels-*.so"))
    assert len(libs) == 1 and kernels.record_path(libs[0]).is_file(), list(dest.iterdir())
    assert {oct(p.stat().st_mode & 0o7777) for p in (libs[0], kernels.record_path(libs[0]))} \
        == {"0o644"}
    assert oct(dest.stat().st_mode & 0o7777) == "0o755"
    log.unlink()
    user = tmp_path / "user"
    out = _python(["-m", "deepcd_petsc", "kernels"], user, dest, CC=str(cc))
    assert f"{libs[0].name}: trusted" in out, out
    assert f"loaded           fused C kernels ({libs[0]})\n" in out, out
    assert set(log.read_text().split("\n")) <= {"--version", ""}, log.read_text()
    assert not (user / ".cache" / "deepcd_petsc").exists()


def test_solve_converges_beside_a_planted_library(tmp_path, planted):
    data, marker = planted
    d = _dir(tmp_path, 0o777)
    _plant(kernels.library_path(d), data, 0o666)
    out = _python(["-m", "deepcd_petsc", "solve", "--scene", "spheres", "--n", "16",
                   "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM", "-ksp_view",
                   "--json"], tmp_path, d)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["converged"], res
    assert not marker.exists()
    assert f"kernel cache {d} not trusted (writable by group; writable by others)" in out, out
