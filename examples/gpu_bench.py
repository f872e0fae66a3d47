#!/usr/bin/env python3
"""Network and whole-solve timings with torch only (no PETSc), for a GPU
machine: the network pass at each size and dtype (float32 through the
fused kernels, Triton on a GPU, and through plain torch, with their
difference), and DCDM vs CG on the same device with the matrix-free
operator, in one run.

    python examples/gpu_bench.py --device cuda --sizes 128,256 --out $OUT/gpu.json
    python examples/gpu_bench.py --device cpu --sizes 32            # smoke test

Prints a markdown table and writes JSON (device name included).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepcd_petsc.evaluate import DEFAULT_NORTHO, TorchSystem, cg, dcdm  # noqa: E402
from deepcd_petsc.model import DTYPES, dirichlet_fraction, load_model  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2], out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--scenes", default="spheres,liquid")
    ap.add_argument("--model")
    ap.add_argument("--northo", type=int, default=DEFAULT_NORTHO)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"
    rows = []
    for n in [int(v) for v in a.sizes.split(",")]:
        for scene in a.scenes.split(","):
            s = TorchSystem(scene, (n, n, n), 1, device=dev)
            stencil_s, _ = timed(lambda: s.op(s.b), dev, a.repeats)
            row = {"scene": scene, "n": n, "device": name, "stencil_ms": stencil_s * 1e3}
            for dt in a.dtypes.split(","):
                net, _ = load_model(a.model, dtype=dt, device=dev)
                with torch.inference_mode():
                    geo = net.prepare(s.flags, dirichlet_fraction(s.flags, s.faces),
                                      dtype=DTYPES[dt], device=dev)
                    r = (s.b / s.b.norm()).to(DTYPES[dt])[None, None]
                    fwd, y = timed(lambda: net(r, geo), dev, a.repeats)
                    if dt == "float32":
                        # the fused kernels (Triton on a GPU, kernels.c on
                        # the CPU) against the plain torch path, same device
                        used = net.kernels_name(geo)   # after the run: "torch" if Triton failed
                        net.fused = False
                        plain, y0 = timed(lambda: net(r, geo), dev, a.repeats)
                        net.fused = True
                        row.update(kernels=used, net_float32_torch_ms=plain * 1e3,
                                   fused_vs_torch=((y - y0).abs().max() / y0.abs().max()).item())
                row[f"net_{dt}_ms"] = fwd * 1e3
                row[f"net_{dt}_stencils"] = fwd / stencil_s
                if dt == "float32":
                    sync(dev)
                    t = time.perf_counter()
                    its, hist = dcdm(s, net, geo, northo=a.northo, maxit=1000)
                    sync(dev)
                    row.update(dcdm_its=its, dcdm_s=time.perf_counter() - t, dcdm_final=hist[-1])
            sync(dev)
            t = time.perf_counter()
            its, hist = cg(s)
            sync(dev)
            row.update(cg_its=its, cg_s=time.perf_counter() - t)
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = ["scene", "n", "stencil_ms", "kernels"] + [k for k in rows[0] if k.startswith("net_")] + \
        ["fused_vs_torch", "dcdm_its", "dcdm_s", "cg_its", "cg_s"]
    print(f"device: {name}, torch {torch.__version__}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
