"""Fused C kernels (kernels.c), compiled on first use and cached.

Why compiled: DCDM's vector work and the V-cycle network are memory-bound,
and torch makes one pass per operation; fusing the A-orthogonalisation
with its dot products, the x/r update with the residual norm, and each
smoothing step of the network into one stencil pass removes most passes. Why at run time:
the package stays pure Python (pip install needs no compiler), the build
uses -march=native on the machine that runs it, and a cluster node without
a compiler still works: every kernel has a torch fallback (workspace.py,
mgnet.py), and DEEPCD_KERNELS=0 forces it.

The library links libgomp.so.1; loaded after torch, it binds to the OpenMP
runtime torch already loaded (same soname), so one thread pool serves both.
Cache: $DEEPCD_KERNEL_DIR, else $XDG_CACHE_HOME/deepcd_petsc, else
~/.cache/deepcd_petsc; the file name hashes the source, the compiler, its
options and the CPU flags (nodes of another CPU type build their own copy).
"""
import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]     # then -march=native, or without
MAXK = 16      # vectors per fused reduction (MAXK in kernels.c)
_state = {"lib": None, "status": None}

_d = ctypes.c_double
_pd = ctypes.POINTER(ctypes.c_double)
_ptrs = ctypes.POINTER(ctypes.c_void_p)
_long, _int = ctypes.c_long, ctypes.c_int
SIGNATURES = {
    "deepcd_dots": [_long, ctypes.c_void_p, _int, _ptrs, _pd, _int],
    "deepcd_orth_update": [_long, _int, _pd, _ptrs, _ptrs, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p, _pd, _int],
    "deepcd_step": [_long, _d, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_void_p, _pd, _int],
}
_v, _f = ctypes.c_void_p, ctypes.c_float
MG_SIGNATURES = {
    "deepcd_mg_input": [_int, _int, _int, _int, _int, _int, _v, _f, _v, _v, _int],
    "deepcd_mg_first": [_int, _int, _int, _v, _v, _v, _int],
    "deepcd_mg_resid": [_int, _int, _int, _v, _v, _v, _v, _int],
    "deepcd_mg_step": [_int, _int, _int, _v, _v, _v, _v, _int, _int],
    "deepcd_mg_step_out": [_int, _int, _int, _v, _v, _v, _v, _int, _int, _int, _v, _int],
    "deepcd_mg_restrict": [_int, _int, _int, _v, _v, _v, _v, _v, _v, _int],
    "deepcd_mg_prolong": [_int, _int, _int, _v, _f, _v, _v, _int],
}


def cache_dir():
    env = os.environ.get("DEEPCD_KERNEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepcd_petsc"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler():
    return shlex.split(os.environ.get("CC", "cc"))


def _build():
    cc = _compiler()
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({' '.join(cc)}: {e})") from None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + repr((cc, version, FLAGS, _cpu_flags(),
                                     platform.machine())).encode())
    out = cache_dir() / f"deepcd_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: ranks building at once never
    # load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        errors = []
        for arch in (["-march=native"], []):
            cmd = cc + [*FLAGS, *arch, "-o", tmp, str(SOURCE)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if p.returncode == 0:
                os.replace(tmp, out)
                return out
            errors.append(p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"])
        raise RuntimeError(f"{' '.join(cc)} failed: {errors[-1][0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load():
    """The kernel library, or None (status() says why)."""
    if _state["status"] is not None:
        return _state["lib"]
    if os.environ.get("DEEPCD_KERNELS", "1") == "0":
        _state["status"] = "torch (DEEPCD_KERNELS=0)"
        return None
    try:
        import torch  # noqa: F401  (its OpenMP runtime first: see the module docstring)
        path = _build()
        lib = ctypes.CDLL(str(path))
        for name, args in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        for name, args in MG_SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        _state["lib"] = lib
        _state["status"] = f"fused C kernels ({path})"
    except Exception as e:   # any failure: the torch path, and say why
        _state["status"] = f"torch (C kernels unavailable: {e})"
    return _state["lib"]


def status():
    load()
    return _state["status"]


def pointers(tensors):
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


class CKernels:
    """The V-cycle network's fused passes (kernels.c) on contiguous float32
    CPU tensors: (D, H, W) fields, (D+2, H+2, W+2) zero-bordered x/s
    buffers, a step's 7 taps as a tensor. triton_kernels.TritonKernels has
    the same interface for GPUs. Threads: torch's count at each call."""
    name = "C"

    def __init__(self, lib):
        import torch
        self.lib = lib
        self.nt = torch.get_num_threads

    def input(self, r, scale, fluid, b):
        self.lib.deepcd_mg_input(*r.shape, *b.shape, r.data_ptr(), float(scale), fluid.data_ptr(),
                                 b.data_ptr(), self.nt())

    def first(self, b, dinv, sp):
        self.lib.deepcd_mg_first(*b.shape, b.data_ptr(), dinv.data_ptr(), sp.data_ptr(),
                                 self.nt())

    def resid(self, xp, b, dinv, sp):
        self.lib.deepcd_mg_resid(*b.shape, xp.data_ptr(), b.data_ptr(), dinv.data_ptr(),
                                 sp.data_ptr(), self.nt())

    def step(self, sp, w, g, xp, first):
        self.lib.deepcd_mg_step(*g.shape, sp.data_ptr(), w.data_ptr(), g.data_ptr(), xp.data_ptr(),
                                int(first), self.nt())

    def step_out(self, sp, w, g, xp, out):
        self.lib.deepcd_mg_step_out(*g.shape, sp.data_ptr(), w.data_ptr(), g.data_ptr(),
                                    xp.data_ptr(), *out.shape, out.data_ptr(),
                                    self.nt())

    def restrict(self, xp, b, diag, fluid, cmask, cb):
        self.lib.deepcd_mg_restrict(*b.shape, xp.data_ptr(), b.data_ptr(), diag.data_ptr(),
                                    fluid.data_ptr(), cmask.data_ptr(), cb.data_ptr(),
                                    self.nt())

    def prolong(self, e, scale, fluid, xp):
        self.lib.deepcd_mg_prolong(*fluid.shape, e.data_ptr(), float(scale), fluid.data_ptr(),
                                   xp.data_ptr(), self.nt())


def vcycle_kernels():
    """CKernels over the loaded library, or None (status() says why)."""
    lib = load()
    if lib is None:
        return None
    if _state.get("ckernels") is None:
        _state["ckernels"] = CKernels(lib)
    return _state["ckernels"]
