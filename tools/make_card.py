#!/usr/bin/env python3
"""Write the shipped model's card: evaluation at 64³ and 128³ (DCDM, CG,
CG+Jacobi, held-out seed 1), DCDM at 256³, and the cost of one network
application in MatMults (PETSc AIJ MatMult, same grid, 1 thread).

    python tools/make_card.py MODEL.pt CARD.md "TRAIN COMMAND" [--sizes 64,128] [--big 256]
"""
import argparse
import statistics
import time

import petsc4py
petsc4py.init([])
import torch  # noqa: E402

from deepcd_petsc.evaluate import evaluate  # noqa: E402
from deepcd_petsc.evaluator import NetworkEvaluator  # noqa: E402
from deepcd_petsc.memory import tune_malloc  # noqa: E402
from deepcd_petsc.model import dirichlet_fraction, load_model  # noqa: E402
from deepcd_petsc.problem import Problem  # noqa: E402
from deepcd_petsc.training.trainer import write_model_card  # noqa: E402


def cost(model, n, repeats=10):
    p = Problem.from_scene("spheres", (n, n, n), seed=1)
    net, _ = load_model(model)
    ev = NetworkEvaluator(net, p.da, p.local_flags, dirichlet_fraction(p.flags, p.open_faces))
    y = p.b.duplicate()
    tm, tn = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        p.A.mult(p.b, y)
        tm.append(time.perf_counter() - t)
        t = time.perf_counter()
        ev.apply(p.b, y)
        tn.append(time.perf_counter() - t)
    mm, nn = statistics.median(tm), statistics.median(tn[1:])
    ev.destroy()
    y.destroy()
    p.destroy()
    return f"{n}³: {nn * 1e3:.1f} ms = {nn / mm:.1f} MatMults ({mm * 1e3:.1f} ms)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("card")
    ap.add_argument("command")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--big", default="256", help="sizes evaluated without baselines ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tune_malloc()
    net, ck = load_model(a.model)
    scenes = ["spheres", "smoke", "liquid"]
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = evaluate(net, scenes, sizes, [1], progress=print)
    if a.big:
        rows += evaluate(net, scenes, [int(s) for s in a.big.split(",")], [1], baselines=False,
                         progress=print)
    for r in rows:
        r.setdefault("cg", "–")
        r.setdefault("cg_jacobi", "–")
    costs = "; ".join(cost(a.model, n) for n in sizes) + f" (PETSc 3.18, {a.threads} thread)"
    write_model_card(a.card, a.model, ck["meta"], rows, a.command, cost=costs)
    print(open(a.card).read())


if __name__ == "__main__":
    main()
