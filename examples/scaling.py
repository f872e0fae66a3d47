#!/usr/bin/env python3
"""Strong and weak scaling of the distributed network evaluation, and the
halo cost model.

    python examples/scaling.py model                       # cost model table (no MPI)
    python examples/scaling.py strong --n 128 --ranks 1,2  # launches mpiexec per rank count
    python examples/scaling.py weak --block 64 --ranks 1,2,4,8

Each measurement runs the default network on a `spheres` scene with one torch
thread per rank and reports the median time per application, the halo
exchange time and bytes per rank, and the peak memory per rank.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def model_table(args):
    sys.path.insert(0, os.path.dirname(HERE))
    from deepcd_petsc.halo import halo_cost
    from deepcd_petsc.mgnet import gather_level
    from deepcd_petsc.model import load_model
    net, _ = load_model(args.model)
    print(f"per network application and rank, cubic blocks, float32 ({net.describe()})")
    print("| N³ on P ranks | levels | block alignment | ranks with a block | block side "
          "| halo bytes sent | stencil FLOPs | bytes/FLOP | exchanges (+1 allgather) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, p in [(256, 8), (256, 64), (256, 512), (512, 64), (512, 512), (1024, 512), (1024, 4096),
                 (2048, 4096), (2048, 32768)]:
        levels = net.levels_for((n, n, n))
        m = net.multiple_for((n, n, n))
        active = min(p, (n // m) ** 3)       # blocks are whole multiples of m
        b = round(n / active ** (1 / 3))
        g = gather_level([(n >> l) ** 3 for l in range(levels)]) if hasattr(net, "level_cap") else None
        sent, flops, ex = halo_cost(net, b, levels=levels, gather_from=g, grid=n)
        print(f"| {n}³ on {p} | {levels} | {m} | {active} | {b} | {sent / 1e6:.2f} MB | "
              f"{flops / 1e9:.3f} GFLOP | {sent / flops:.1e} | {ex} |")


def measure(args):
    import petsc4py
    petsc4py.init([])
    from petsc4py import PETSc
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(HERE))
    from deepcd_petsc.evaluator import NetworkEvaluator
    from deepcd_petsc.memory import tune_malloc
    tune_malloc()            # as the KSP/PC do
    from deepcd_petsc.model import dirichlet_fraction, load_model
    from deepcd_petsc.problem import Problem
    comm = PETSc.COMM_WORLD
    shape = tuple(int(v) for v in args.shape.split(","))
    p = Problem.from_scene("spheres", shape, seed=7)
    net, _ = load_model(args.model)
    (xs, xe), (ys, ye), (zs, ze) = p.da.getRanges()
    ev = NetworkEvaluator(net, p.da, p.local_flags,
                          dirichlet_fraction(p.flags, p.open_faces)[zs:ze, ys:ye, xs:xe])
    y = p.b.duplicate()
    ev.apply(p.b, y)                       # warm-up
    times, halo, nbytes, forward = [], [], [], []
    for _ in range(args.repeats):
        h0, b0 = (ev.halo.seconds, ev.halo.bytes) if ev.halo else (0.0, 0)
        f0 = ev.forward_s
        comm.barrier()
        t = time.perf_counter()
        ev.apply(p.b, y)
        comm.barrier()
        times.append(time.perf_counter() - t)
        forward.append(ev.forward_s - f0)
        if ev.halo:
            halo.append(ev.halo.seconds - h0)
            nbytes.append(ev.halo.bytes - b0)
    mpi = comm.tompi4py()
    with open("/proc/self/status") as f:
        peak = [int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM")][0]
    out = {"ranks": comm.getSize(), "shape": shape, "apply_s": statistics.median(times),
           "forward_s": max(mpi.allgather(statistics.median(forward))),
           "halo_s": max(mpi.allgather(statistics.median(halo) if halo else 0.0)),
           "halo_bytes_per_rank": max(mpi.allgather(statistics.median(nbytes) if nbytes else 0)),
           "peak_mb_per_rank": max(mpi.allgather(peak)),
           "blocks": list(ev.dec.procs) if ev.dec else [1, 1, 1]}
    ev.destroy()
    y.destroy()
    p.destroy()
    if comm.getRank() == 0:
        print("RESULT " + json.dumps(out), flush=True)


def launch(args, ranks, shape):
    cmd = [sys.executable, __file__, "measure", "--shape", ",".join(map(str, shape)),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec")
        cmd = [mpiexec, "-n", str(ranks), "--oversubscribe"] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"measurement failed for {ranks} rank(s):\n{r.stdout}\n{r.stderr}")


def scaling(args):
    ranks = [int(v) for v in args.ranks.split(",")]
    rows = []
    for p in ranks:
        if args.mode == "strong":
            shape = (args.n,) * 3
        else:
            # weak: ~block³ cells per rank, grid grows along x, y, z in turn
            dims, k, i = [args.block] * 3, 1, 0
            while k < p:
                dims[i % 3] *= 2
                k *= 2
                i += 1
            shape = tuple(dims)
        rows.append(launch(args, p, shape))
    base = rows[0]["apply_s"]
    print(f"{args.mode} scaling, {args.threads} torch thread(s) per rank")
    print("| ranks | grid | blocks | apply (s) | speed-up | forward (s) | halo (s) | halo MB/rank "
          "| peak MB/rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {'x'.join(map(str, r['shape']))} | {'x'.join(map(str, r['blocks']))} | "
              f"{r['apply_s']:.4f} | {base / r['apply_s']:.2f} | {r['forward_s']:.4f} | "
              f"{r['halo_s']:.4f} | {r['halo_bytes_per_rank'] / 1e6:.2f} | {r['peak_mb_per_rank']:.0f} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["model", "strong", "weak", "measure"])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--shape", default="64,64,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if args.mode == "model":
        model_table(args)
    elif args.mode == "measure":
        measure(args)
    else:
        scaling(args)


if __name__ == "__main__":
    main()
