#!/usr/bin/env python3
"""Time DCDM's three fused Krylov kernels for one iteration (β dot
products, A-orthogonalisation with dᵀr and dᵀAd, x/r update with ‖r‖²)
with the vectors in cache ("hot") and evicted first ("cold": 64 MB
streamed in between, as the network's and MatMult's working sets do in a
solve). Shows what an iteration's vector work costs when it comes from
DRAM, for m = 0, 1, 2 previous directions.

    python tools/vector_traffic.py [--n 64] [--threads 2] [--repeats 50]
"""
import argparse
import ctypes
import statistics
import time

import torch

from deepcd_petsc import kernels
from deepcd_petsc.kernels import pointers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lib = kernels.load()
    if lib is None:
        raise SystemExit(f"no fused kernels: {kernels.status()}")
    n, nt = a.n ** 3, a.threads
    g = torch.Generator().manual_seed(0)
    x, r, d, q, *hist = [torch.randn(n, dtype=torch.float64, generator=g) for _ in range(8)]
    big = torch.zeros(64 * 2**20 // 8, dtype=torch.float64)
    out = (ctypes.c_double * 4)()
    print(f"{a.n}³ float64 vectors of {n * 8 / 2**20:.1f} MB, {nt} threads, "
          f"median of {a.repeats} (ms)")
    print("m  state  dots   orth   step   sum")
    for m in (0, 1, 2):
        ps, qs = hist[:m], hist[2:2 + m]
        c = (ctypes.c_double * max(m, 1))(*([1e-9] * m))

        def run():
            t = [time.perf_counter()]
            if m:
                lib.deepcd_dots(n, q.data_ptr(), m, pointers(ps), out, nt)
            t.append(time.perf_counter())
            lib.deepcd_orth_update(n, m, c, pointers(ps), pointers(qs), d.data_ptr(),
                                   q.data_ptr(), r.data_ptr(), out, nt)
            t.append(time.perf_counter())
            lib.deepcd_step(n, 1e-9, x.data_ptr(), d.data_ptr(), r.data_ptr(), q.data_ptr(),
                            out, nt)
            t.append(time.perf_counter())
            return [b - a_ for a_, b in zip(t, t[1:])]

        for state in ("hot", "cold"):
            rows = []
            for _ in range(a.repeats):
                if state == "cold":
                    big.add_(1.0)
                rows.append(run())
            med = [statistics.median(col) * 1e3 for col in zip(*rows)]
            print(f"{m}  {state:5s}  " + "  ".join(f"{v:.3f}" for v in med)
                  + f"  {sum(med):.3f}")


if __name__ == "__main__":
    main()
