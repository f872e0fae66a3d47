"""Keep large temporaries in the heap instead of fresh mmaps.

Why: the network's temporaries at 128³ and above (8–64 MB each) exceed
glibc's mmap threshold, so every one is a new mmap whose pages the kernel
zero-fills on first touch and unmaps on free (measured: a network pass at
128³ took 130–160 ms instead of 65 ms on this machine). Serving them from
the heap lets freed blocks be reused. The process then keeps up to `limit`
bytes of freed memory instead of returning it to the system. Disable with
DEEPCD_MALLOPT=0.
"""
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_done = False


def tune_malloc(limit=1 << 30):
    """Serve large blocks from the heap and keep up to `limit` freed bytes,
    once per process (glibc only; a no-op elsewhere); True when applied."""
    global _done
    if _done or os.environ.get("DEEPCD_MALLOPT", "1") == "0":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # (raising M_MMAP_THRESHOLD is not enough: glibc caps it at 32 MB)
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, limit) == 1
    _done = bool(ok)
    return _done
