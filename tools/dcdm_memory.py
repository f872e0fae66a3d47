"""DCDM's own memory per unknown: what set-up and one solve add to the
process beyond the application's matrix and vectors (work vectors, the
stencil and its coarse levels, the network's per-level fields, transients).

    python tools/dcdm_memory.py --scene density --n 256 [--threads 1]

Prints (bytes per unknown): `live` = memory malloc has handed out after the
solve minus before set-up (what stays while the KSP lives), `resident` =
the same in resident set (also freed memory the allocator keeps), `peak` =
the high-water mark during set-up and solve minus the resident set before
set-up (transients included). Linux with glibc (/proc/self, mallinfo2)."""
import argparse
import ctypes
import ctypes.util
import sys
import time


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def _live():
    """Bytes malloc has handed out and not taken back (glibc mallinfo2):
    unlike the resident set, not inflated by freed memory the allocator
    keeps (tune_malloc keeps up to 1 GiB of it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", default="density", help="flag scene or operator family")
    ap.add_argument("--n", type=int, default=128, help="cubic grid size N")
    ap.add_argument("--seed", type=int, default=3, help="scene seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--maxit", type=int, default=30,
                    help="iterations to run (the memory does not grow with them; default 30)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)
    import petsc4py
    petsc4py.init([])
    from petsc4py import PETSc
    import torch
    torch.set_num_threads(a.threads)
    from deepcd_petsc.memory import tune_malloc
    from deepcd_petsc.model import load_model
    from deepcd_petsc.problem import Problem
    from deepcd_petsc.solvers import clear_options, set_options
    from deepcd_petsc.petsc_compat import set_dm_inactive
    tune_malloc()              # as DCDM does at set-up: its effect is not DCDM's memory
    load_model()               # torch's and the model's code pages are not per-unknown memory
    p = Problem.from_scene(a.scene, (a.n,) * 3, seed=a.seed)
    x = p.b.duplicate()
    opts = {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM", "ksp_rtol": "1e-6",
            "ksp_max_it": str(a.maxit), "ksp_dcdm_threads": str(a.threads)}
    set_options("mem_", opts)
    ksp = PETSc.KSP().create(p.A.getComm())
    ksp.setOptionsPrefix("mem_")
    ksp.setOperators(p.A)
    ksp.setDM(p.da)
    set_dm_inactive(ksp)
    ksp.setFromOptions()
    time.sleep(0.1)
    base = _status("VmRSS")
    live0 = _live()
    _reset_peak()
    x.set(0.0)
    ksp.solve(p.b, x)
    peak = _status("VmHWM")
    steady = _status("VmRSS")
    live = _live()
    n = a.n ** 3
    out = {"scene": a.scene, "n": a.n, "iterations": ksp.getIterationNumber(),
           "live_B_per_unknown": (live - live0) / n,
           "resident_B_per_unknown": (steady - base) / n, "peak_B_per_unknown": (peak - base) / n}
    ksp.destroy()
    clear_options("mem_", opts)
    if a.json:
        import json
        print(json.dumps(out))
    else:
        print(f"{a.scene} {a.n}^3: {out['iterations']} iterations; DCDM's own memory "
              f"{out['live_B_per_unknown']:.0f} B/unknown live after the solve (malloc), "
              f"{out['resident_B_per_unknown']:.0f} resident, {out['peak_B_per_unknown']:.0f} peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
