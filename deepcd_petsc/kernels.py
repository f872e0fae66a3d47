"""Fused C kernels (kernels.c), compiled on first use and cached.

Why compiled: DCDM's vector work and the V-cycle network are memory-bound,
and torch makes one pass per operation; fusing the A-orthogonalisation
with its dot products, the x/r update with the residual norm, and each
smoothing step of the network into one stencil pass removes most passes;
reading an assembled operator's rows at set-up (stencil.read_aij) is one
pass over its CSR arrays where NumPy made dozens. Why at run time:
the package stays pure Python (pip install needs no compiler), the build
uses -march=native on the machine that runs it, and a cluster node without
a compiler still works: every kernel has a torch (or NumPy) fallback
(workspace.py, mgnet.py, stencil.py), and DEEPCD_KERNELS=0 forces it.

The library links libgomp.so.1; loaded after torch, it binds to the OpenMP
runtime torch already loaded (same soname), so one thread pool serves both.
Cache: $DEEPCD_KERNEL_DIR, else $XDG_CACHE_HOME/deepcd_petsc, else
~/.cache/deepcd_petsc; the file name hashes the source, the compiler, its
options and the CPU flags (nodes of another CPU type build their own copy).

Trust. Loading a library runs its constructors inside every process that
loads it, so a file that another user could have written is never loaded.
Like OpenSSH's StrictModes, a cached library is loaded only when
  - it is a regular file, not a symbolic link (opened with O_NOFOLLOW and
    checked with fstat on that descriptor), owned by us (the effective uid)
    or root, and writable by neither group nor others;
  - its directory and every ancestor (symbolic links resolved first) are
    owned by us or root and writable by neither group nor others, unless
    the sticky bit is set (as on /tmp);
  - the sha256 of its content, read from the open descriptor, equals the
    record <library>.sha256 written beside it when it was built (sha256sum's
    format: hash and file name), the record passing the same file checks.
The checked descriptor itself is loaded (/proc/self/fd/N on Linux), so the
file cannot be swapped between the check and the load. Anything else is
refused: the kernels are then built into the per-user cache (created 0700;
a fresh mkdtemp directory if that is untrusted too), and status() names the
refused file or directory and why. Builds compile to a temporary file beside
the target under a lock (ranks starting at once compile once), and the
record, then the library, are renamed into place with mode 0644: a reader
never loads a half-written file (it would not match its record).
`deepcd kernels --install DIR` is the safe way to share one build per CPU
type on a cluster (see the README).
"""
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import math
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]     # then -march=native, or without
MAXK = 16      # vectors per fused reduction (MAXK in kernels.c)
LOCK = ".deepcd_kernels.lock"
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
    # (the int before the thread count of a stencil pass: zt, 0 on 2D grids: no z taps)
    "deepcd_mg_resid": [_int, _int, _int, _v, _v, _v, _v, _int, _int],
    "deepcd_mg_step": [_int, _int, _int, _v, _v, _v, _v, _int, _int, _int],
    "deepcd_mg_step_out": [_int, _int, _int, _v, _v, _v, _v, _int, _int, _int, _v, _int, _int],
    "deepcd_mg_restrict": [_int, _int, _int, _v, _v, _v, _v, _v, _v, _int],
    "deepcd_mg_restrict_s": [_int] * 6 + [_v] * 6 + [_int, _int],
    # levels with coefficients (stencil.py)
    # (cs before zt: 1 with a coupling plane per face, 0 with one value per face)
    "deepcd_mgc_resid": [_int, _int, _int, _v, _v, _v, _v, _v, _int, _int, _int],
    "deepcd_mgc_bax": [_int, _int, _int, _v, _v, _v, _v, _v, _v, _int, _int, _int],
    "deepcd_mgc_step": [_int, _int, _int, _v, _v, _v, _v, _v, _v, _int, _int, _int, _int],
    # semi-coarsened levels (factors per axis)
    "deepcd_mgc_restrict_s": [_int] * 6 + [_v] * 7 + [_int, _int, _int],
    "deepcd_mg_prolong_s": [_int] * 6 + [_v, _f, _v, _v, _int],
    "deepcd_mgc_energy": [_int, _int, _int, _v, _v, _v, _v, _pd, _int, _int, _int],
    # set-up: Galerkin coarsening (float64), a 2D level's gates
    "deepcd_galerkin": [_int] * 6 + [_v, _v, _v, _d, _v, _v, _v, _int],
    "deepcd_gates2d": [_int] * 5 + [_v] * 7 + [_int],
    "deepcd_couplings": [_int, _int, _int, _v, _v, _v, _v, _pd, _int, _int],
    "deepcd_axis_strengths": [_long, _v, _pd, _int],
    # island deflation (islands.Deflation)
    "deepcd_defl_gather": [_long, _v, _v, _v, _v, _long, _v, _v, _v, _v],
    "deepcd_defl_scatter": [_long, _v, _v, _d, _v],
}
# reading an assembled operator's rows (stencil.read_aij); returns a count
CSR_SIGNATURES = {
    "deepcd_csr_read": [_int, _int, _int, _long, _v, _v, _int, _v, _v, _v, _v, _v, _v, _long,
                        _int],
}


class Untrusted(Exception):
    """A file or directory that must not be loaded from; the message says why."""


def cache_dir():
    """The configured cache: $DEEPCD_KERNEL_DIR, else the per-user one."""
    env = os.environ.get("DEEPCD_KERNEL_DIR")
    return Path(env) if env else private_dir()


def private_dir():
    """The per-user cache, where kernels are built when the configured one is refused."""
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


def library_name():
    """This node's file name: hashes the source, compiler, options and CPU
    flags, so nodes of another CPU type or compiler never share a build.
    RuntimeError without a compiler."""
    cc = _compiler()
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({' '.join(cc)}: {e})") from None
    key = hashlib.sha256(SOURCE.read_bytes() + repr((cc, version, FLAGS, _cpu_flags(),
                                                     platform.machine())).encode())
    return f"deepcd_kernels-{key.hexdigest()[:16]}.so"


def library_path(directory=None):
    """The library load() looks for first: this node's file in `directory`
    (default: the configured cache)."""
    return Path(directory or cache_dir()) / library_name()


def record_path(path):
    return Path(path).with_name(Path(path).name + ".sha256")


# --- trust checks --------------------------------------------------------

def _mode_problems(st):
    """Why a file or directory with this stat could have been written by
    someone else ([] when it could not)."""
    why = []
    if st.st_uid not in (os.geteuid(), 0):
        why.append(f"owned by uid {st.st_uid}")
    if not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):   # sticky: like /tmp
        why += [w for bit, w in ((stat.S_IWGRP, "writable by group"),
                                 (stat.S_IWOTH, "writable by others")) if st.st_mode & bit]
    return why


def dir_problem(directory):
    """Why files in `directory` cannot be trusted (None when they can): it
    and every ancestor, symbolic links resolved, must pass _mode_problems,
    or else someone else could replace our files or the directory itself."""
    d = Path(os.path.realpath(directory))
    for p in (d, *d.parents):
        try:
            why = _mode_problems(os.stat(p))
        except OSError as e:
            return f"{p}: {e.strerror}"
        if why:
            return "; ".join(why) if p == d else f"ancestor {p} {'; '.join(why)}"
    return None


def _open_checked(path):
    """A descriptor on the regular file `path`, opened without following a
    symbolic link and checked on the descriptor (not the name, which could be
    swapped). Raises Untrusted, or FileNotFoundError when absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Untrusted("a symbolic link") from None
        raise
    st = os.fstat(fd)
    why = ([] if stat.S_ISREG(st.st_mode) else ["not a regular file"]) + _mode_problems(st)
    if why:
        os.close(fd)
        raise Untrusted("; ".join(why))
    return fd


def _read_all(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _record(path):
    """The record's words: [sha256, file name] (the name too, so that a
    record cannot vouch for a file of another name)."""
    rec = record_path(path)
    try:
        fd = _open_checked(rec)
    except FileNotFoundError:
        raise Untrusted(f"no record {rec.name}") from None
    except Untrusted as e:
        raise Untrusted(f"record {rec.name}: {e}") from None
    try:
        return os.read(fd, 4096).decode("ascii", "replace").split()
    finally:
        os.close(fd)


def open_trusted(path):
    """A descriptor on `path` when it is a trusted library (the module
    docstring's file checks, and its content hashes to its record); the
    caller loads that descriptor, so what was hashed is what runs. Raises
    Untrusted, or FileNotFoundError when absent."""
    path = Path(path)
    fd = _open_checked(path)
    try:
        if [hashlib.sha256(_read_all(fd)).hexdigest(), path.name] != _record(path):
            raise Untrusted(f"content does not match {record_path(path).name}")
        return fd
    except BaseException:
        os.close(fd)
        raise


# --- building ------------------------------------------------------------

def _write_beside(target, data, mode):
    """Write to a temporary file in target's directory and rename it onto
    target: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(path, data):
    """Put library bytes at `path` with their record, both 0644. Record
    first: a reader between the two renames sees a mismatch and refuses."""
    digest = hashlib.sha256(data).hexdigest()
    _write_beside(record_path(path), f"{digest}  {path.name}\n".encode(), 0o644)
    _write_beside(path, data, 0o644)


def _compile(path):
    """Compile kernels.c (with -march=native, else without) and publish it at `path`."""
    cc = _compiler()
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        errors = []
        for arch in (["-march=native"], []):
            p = subprocess.run(cc + [*FLAGS, *arch, "-o", tmp, str(SOURCE)],
                               capture_output=True, text=True, timeout=120)
            if p.returncode == 0:
                with open(tmp, "rb") as f:
                    return publish(path, f.read())
            errors.append(p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"])
        raise RuntimeError(f"{' '.join(cc)} failed: {errors[-1][0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(directory):
    """Hold the directory's build lock, so ranks starting at once wait for one
    compile. No lock where we cannot create one (a read-only shared cache) or
    where it is someone else's (they could hold it forever)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError:
        fd = None
    if fd is not None and _mode_problems(os.fstat(fd)):
        os.close(fd)
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


# --- finding a trusted library -------------------------------------------

def _find_or_build(directory, name, ours):
    """(descriptor, built) for `name` in the trusted `directory`: its trusted
    library, else one compiled there. An untrusted file is replaced only in
    a cache of ours (e.g. one built before records existed); elsewhere it is
    refused (Untrusted). OSError: absent and the directory is not writable."""
    path = directory / name
    try:
        return open_trusted(path), False
    except (FileNotFoundError, Untrusted):
        pass
    with _locked(directory):         # a concurrent build may just have finished
        try:
            return open_trusted(path), False
        except FileNotFoundError:
            pass
        except Untrusted as e:
            if not ours:
                raise Untrusted(f"kernel library {path} not trusted ({e})") from None
        _compile(path)
        return open_trusted(path), True


def _candidates():
    """(directory, ours, temporary) in the order tried: the configured cache,
    the per-user one, then a fresh private temporary directory."""
    configured, private = cache_dir(), private_dir()
    yield configured, configured == private, False
    if configured != private:
        yield private, True, False
    yield Path(tempfile.mkdtemp(prefix="deepcd_kernels-")), True, True


def _prepare(directory):
    """The resolved directory, created 0700 when missing (a cache we create is
    private); Untrusted with the note to show when it cannot be used."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise Untrusted(f"kernel cache {directory} cannot be created ({e.strerror})") from None
    d = Path(os.path.realpath(directory))   # resolved once: what is checked is what is used
    why = dir_problem(d)
    if why:
        raise Untrusted(f"kernel cache {directory} not trusted ({why})")
    return d


def locate():
    """(descriptor, path, note, temporary): this node's trusted library,
    found or built in the first usable cache; note says what was refused and
    where the library came from instead (None when nothing was refused)."""
    name = library_name()
    notes = []
    for directory, ours, temporary in _candidates():
        try:
            d = _prepare(directory)
            fd, built = _find_or_build(d, name, ours)
        except Untrusted as e:
            notes.append(str(e))
        except OSError as e:
            notes.append(f"kernel cache {directory} has no usable {name} and cannot be "
                         f"written ({e.strerror})")
        else:
            return fd, d / name, _note(notes, built, d, temporary), temporary
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError("; ".join(notes))


def _note(notes, built, directory, temporary):
    """One line for status(): what was refused and why, and where the library
    came from instead (None when nothing was refused)."""
    if not notes:
        return None
    where = f"{'built in' if built else 'loaded from'} {directory}"
    return "; ".join(notes) + f": {where}" + (" (temporary, removed)" if temporary else "")


def _dlopen(fd, path):
    """Load the checked descriptor itself where /proc/self/fd exists (no race
    between check and load), else the path (checked just before)."""
    proc = f"/proc/self/fd/{fd}"
    return ctypes.CDLL(proc if os.path.exists(proc) else str(path))


def _release(fd, path, temporary):
    """Close the descriptor; a temporary cache goes once its library is
    loaded or copied (the mapping outlives the file)."""
    os.close(fd)
    if temporary:
        shutil.rmtree(path.parent, ignore_errors=True)


def _declare(lib):
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    for name, args in MG_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    for name, args in CSR_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_long


def load():
    """The kernel library, or None (status() says why)."""
    if _state["status"] is not None:
        return _state["lib"]
    if os.environ.get("DEEPCD_KERNELS", "1") == "0":
        _state["status"] = "torch (DEEPCD_KERNELS=0)"
        return None
    try:
        import torch  # noqa: F401  (its OpenMP runtime first: see the module docstring)
        fd, path, note, temporary = locate()
        try:
            lib = _dlopen(fd, path)
        finally:
            _release(fd, path, temporary)
        _declare(lib)
        _state["lib"] = lib
        _state["status"] = f"fused C kernels ({path})" + (f"; {note}" if note else "")
    except Exception as e:   # any failure: the torch path, and say why
        _state["status"] = f"torch (C kernels unavailable: {e})"
    return _state["lib"]


def status():
    load()
    return _state["status"]


def _verdict(path):
    try:
        os.close(open_trusted(path))
        return "trusted"
    except FileNotFoundError:
        return "absent"
    except (Untrusted, OSError) as e:
        return f"not trusted ({e})"


def report():
    """(label, value) lines for `deepcd kernels`: the configured cache, whether
    it and this node's library in it are trusted and why, then what load()
    did (which file it loaded, or why the torch path)."""
    d = cache_dir()
    origin = "DEEPCD_KERNEL_DIR" if os.environ.get("DEEPCD_KERNEL_DIR") else "per-user default"
    lines = [("kernel cache", f"{d} ({origin})")]
    if not os.path.isdir(d):
        lines.append(("  directory", "absent (created 0700 on first use)"))
    else:
        why = dir_problem(d)
        lines.append(("  directory", "trusted" if why is None else f"not trusted ({why})"))
        with contextlib.suppress(RuntimeError):       # no compiler: status() says so
            path = library_path(os.path.realpath(d))
            lines.append(("  library", f"{path.name}: {_verdict(path)}"))
    return lines + [("loaded", status())]


def install(dest):
    """Put this node's trusted library (the cached one, or built now) and its
    record into `dest`, mode 0644, `dest` 0755, and return the installed path
    once it passes the same checks as load(). Raises Untrusted, RuntimeError
    (no compiler) or OSError."""
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(dest))
    os.makedirs(dest, exist_ok=True)
    os.chmod(dest, 0o755)
    d = Path(os.path.realpath(dest))
    why = dir_problem(d)
    if why:
        raise Untrusted(f"{dest} not trusted ({why})")
    fd, path, _, temporary = locate()
    try:
        data = _read_all(fd)
    finally:
        _release(fd, path, temporary)
    target = d / path.name
    publish(target, data)
    os.close(open_trusted(target))
    return target


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

    # `flat`: a 2D grid (nz = 1 on every rank): the stencils skip the z taps
    def resid(self, xp, b, dinv, sp, flat=False):
        self.lib.deepcd_mg_resid(*b.shape, xp.data_ptr(), b.data_ptr(), dinv.data_ptr(),
                                 sp.data_ptr(), int(not flat), self.nt())

    def step(self, sp, w, g, xp, first, flat=False):
        self.lib.deepcd_mg_step(*g.shape, sp.data_ptr(), w.data_ptr(), g.data_ptr(), xp.data_ptr(),
                                int(first), int(not flat), self.nt())

    def step_out(self, sp, w, g, xp, out, flat=False):
        self.lib.deepcd_mg_step_out(*g.shape, sp.data_ptr(), w.data_ptr(), g.data_ptr(),
                                    xp.data_ptr(), *out.shape, out.data_ptr(),
                                    int(not flat), self.nt())

    def restrict(self, xp, b, diag, fluid, cmask, cb):
        self.lib.deepcd_mg_restrict(*b.shape, xp.data_ptr(), b.data_ptr(), diag.data_ptr(),
                                    fluid.data_ptr(), cmask.data_ptr(), cb.data_ptr(),
                                    self.nt())

    def restrict_fs(self, factors, xp, b, diag, fluid, cmask, cb, flat=False):
        """restrict (the unit operator's levels) for aggregates of factors
        (fz, fy, fx): a 2D grid's (1, 2, 2)."""
        self.lib.deepcd_mg_restrict_s(*b.shape, *factors, xp.data_ptr(), b.data_ptr(),
                                      diag.data_ptr(), fluid.data_ptr(), cmask.data_ptr(),
                                      cb.data_ptr(), int(not flat), self.nt())

    def resid_c(self, xp, b, dinv, coef, sp, flat=False):
        """coef: (6, D, H, W) planes, or 6 values (an axis-uniform level)."""
        self.lib.deepcd_mgc_resid(*b.shape, xp.data_ptr(), b.data_ptr(), dinv.data_ptr(),
                                  coef.data_ptr(), sp.data_ptr(), _planes(coef, b), int(not flat),
                                  self.nt())

    def bax(self, xp, b, diag, fluid, coef, r, flat=False):
        """r = fluid·(b − A x), x in xp (ghosts filled)."""
        self.lib.deepcd_mgc_bax(*b.shape, xp.data_ptr(), b.data_ptr(), diag.data_ptr(),
                                fluid.data_ptr(), coef.data_ptr(), r.data_ptr(), _planes(coef, b),
                                int(not flat), self.nt())

    def step_c(self, sp, w, coef, tnorm, g, xp, first, flat=False):
        self.lib.deepcd_mgc_step(*g.shape, sp.data_ptr(), w.data_ptr(), coef.data_ptr(),
                                 tnorm.data_ptr(), g.data_ptr(), xp.data_ptr(), int(first),
                                 _planes(coef, g), int(not flat), self.nt())

    def restrict_c(self, xp, b, diag, coef, fluid, cmask, cb, flat=False):
        self.restrict_s((2, 2, 2), xp, b, diag, coef, fluid, cmask, cb, flat)

    def prolong(self, e, scale, fluid, xp):
        self.prolong_s((2, 2, 2), e, scale, fluid, xp)

    def restrict_s(self, factors, xp, b, diag, coef, fluid, cmask, cb, flat=False):
        """restrict_c for aggregates of factors (fz, fy, fx) cells; fluid
        masks the rows of a level with six coupling values."""
        self.lib.deepcd_mgc_restrict_s(*b.shape, *factors, xp.data_ptr(), b.data_ptr(),
                                       diag.data_ptr(), coef.data_ptr(), fluid.data_ptr(),
                                       cmask.data_ptr(), cb.data_ptr(), _planes(coef, b),
                                       int(not flat), self.nt())

    def energy(self, xp, cb, diag, coef, flat=False):
        """(Σ e·cb, Σ e·Ae) of a coefficient level, e in xp (ghosts filled)."""
        out = (ctypes.c_double * 2)()
        self.lib.deepcd_mgc_energy(*cb.shape, xp.data_ptr(), cb.data_ptr(), diag.data_ptr(),
                                   coef.data_ptr(), out, _planes(coef, cb), int(not flat), self.nt())
        return out[0], out[1]

    def prolong_s(self, factors, e, scale, fluid, xp):
        self.lib.deepcd_mg_prolong_s(*fluid.shape, *factors, e.data_ptr(), float(scale),
                                     fluid.data_ptr(), xp.data_ptr(), self.nt())


def _planes(coef, field):
    """1 when coef holds a plane per face for field's cells, 0 when it holds
    one value per face (six floats); anything else is a caller's bug that
    would read out of bounds."""
    if coef.numel() == 6:
        return 0
    if coef.numel() != 6 * field.numel() or not coef.is_contiguous():
        raise ValueError(f"coupling planes {tuple(coef.shape)} do not fit a field {tuple(field.shape)}")
    return 1


def galerkin(diag, coef, active, factors, g):
    """(diag, coef, scale) of mgnet.galerkin_coarsen's coarse level and the
    children's Σ|diag·active|, in one C pass: diag (1, 1, D, H, W) and coef
    (1, 6, D, H, W) float64, active float32, on the CPU; None where the
    library is unavailable (the caller coarsens in torch)."""
    import torch
    lib = load()
    if lib is None:
        return None
    D, H, W = diag.shape[-3:]
    shape = tuple(n // k for n, k in zip((D, H, W), factors))
    out = [torch.empty((1, c) + shape, dtype=torch.float64) for c in (1, 6, 1)]
    diag, coef, active = (t.contiguous() for t in (diag, coef, active))
    lib.deepcd_galerkin(D, H, W, *factors, diag.data_ptr(), coef.data_ptr(), active.data_ptr(),
                        float(g), *(t.data_ptr() for t in out), torch.get_num_threads())
    return tuple(out)


def couplings(st, fp, flat):
    """(sd, sc, (lo, hi)) of a stencil (1, 7, D, H, W) float64 and the fluid
    mask with one ghost layer fp (1, 1, D+2, H+2, W+2) float32 in one C
    pass (mgnet._level0_operator); hi NaN when a coupling is. None where
    the library is unavailable."""
    import torch
    lib = load()
    if lib is None:
        return None
    D, H, W = st.shape[-3:]
    st, fp = st.contiguous(), fp.contiguous()
    sd = torch.empty((1, 1, D, H, W), dtype=torch.float64)
    sc = torch.empty((1, 6, D, H, W), dtype=torch.float64)
    out = (ctypes.c_double * 3)()
    lib.deepcd_couplings(D, H, W, st.data_ptr(), fp.data_ptr(), sd.data_ptr(), sc.data_ptr(),
                         out, int(not flat), torch.get_num_threads())
    return sd, sc, (out[1], math.nan if out[2] else out[0])


def axis_strengths(st):
    """mgnet.axis_strengths of a contiguous float64 stencil (7, ...) in one
    C pass, or None where the library is unavailable."""
    import numpy as np
    import torch
    lib = load()
    if lib is None:
        return None
    out = np.zeros(4)
    lib.deepcd_axis_strengths(st[0].numel(), st.data_ptr(), out.ctypes.data_as(_pd),
                              torch.get_num_threads())
    return out


def gates2d(gp, w1, b1, w2, b2, fluid):
    """A 2D level's gates 2σ(w2·gelu(w1 ∗ geometry + b1) + b2)·fluid in one
    C pass (mgnet.level_gates): gp (C, H+2, W+2) the geometry with one
    ghost layer, w1 (O, C, 3, 3), w2 (S, O), fluid (H, W), float32 on the
    CPU. Returns (S, H, W), or None where the library is unavailable."""
    import torch
    lib = load()
    if lib is None:
        return None
    C, H, W = gp.shape[0], gp.shape[1] - 2, gp.shape[2] - 2
    O, S = w1.shape[0], w2.shape[0]
    out = torch.empty((S, H, W), dtype=torch.float32)
    args = [t.contiguous() for t in (gp, w1, b1, w2, b2, fluid)]
    lib.deepcd_gates2d(H, W, C, O, S, *(t.data_ptr() for t in args), out.data_ptr(),
                       torch.get_num_threads())
    return out


def csr_rows(local, lo, ai, aj, av, threads=None):
    """One pass of deepcd_csr_read over this rank's AIJ rows (CSR arrays
    ai, aj, av of A.getValuesCSR(); global row lo + r is cell r of the
    (zm, ym, xm) block `local`): a dict of st (7, n) (the diagonal, then
    minus the six in-block face couplings), rowabs, nnz, coupled (bool:
    cells in-block fluid rows couple to through those faces) and rest (2, m):
    the rows and CSR positions of the entries left over, in entry order.
    None when the library is unavailable or the arrays are of types it does
    not read (indices other than int32/int64, values other than float64):
    the caller reads the rows in NumPy. Threads: torch's count, unless given."""
    import numpy as np
    lib = load()
    if lib is None:
        return None
    ai, aj, av = (np.asarray(a) for a in (ai, aj, av))
    if (ai.dtype != aj.dtype or ai.dtype not in (np.int32, np.int64)
            or av.dtype != np.float64 or ai.ndim != 1 or aj.ndim != 1 or av.ndim != 1):
        return None
    zm, ym, xm = (int(v) for v in local)
    n = zm * ym * xm
    if ai.size != n + 1 or aj.size < int(ai[-1]) or av.size < int(ai[-1]):
        return None
    ai, aj, av = (np.ascontiguousarray(a) for a in (ai, aj, av))   # no copy when contiguous
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    st = np.empty((7, n))
    rowabs = np.empty(n)
    nnz = np.empty(n, np.intc)
    coupled = np.empty(n, np.uint8)
    # left-over entries lie on the block's faces (other ranks, periodic
    # wrap): room for one per face cell, more only for unusual operators
    cap = 2 * (xm * ym + ym * zm + zm * xm) + 256
    while True:
        rest = np.empty((2, cap), np.int64)
        m = lib.deepcd_csr_read(zm, ym, xm, int(lo), ai.ctypes.data, aj.ctypes.data,
                                int(ai.dtype == np.int64), av.ctypes.data, st.ctypes.data,
                                rowabs.ctypes.data, nnz.ctypes.data, coupled.ctypes.data,
                                rest.ctypes.data, cap, int(threads))
        if m < 0:
            return None          # out of memory in the kernel: NumPy's path
        if m <= cap:
            break
        cap = m
    return {"st": st, "rowabs": rowabs, "nnz": nnz, "coupled": coupled.view(bool),
            "rest": rest[:, :m]}


def vcycle_kernels():
    """CKernels over the loaded library, or None (status() says why)."""
    lib = load()
    if lib is None:
        return None
    if _state.get("ckernels") is None:
        _state["ckernels"] = CKernels(lib)
    return _state["ckernels"]
