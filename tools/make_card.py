#!/usr/bin/env python3
"""Write the shipped model's card: evaluation at 64³ and 128³ (DCDM, CG,
CG+Jacobi, held-out seed 1), DCDM at 256³, and the cost of one network
application in MatMults (PETSc AIJ MatMult, same grid, 1 thread).

    python tools/make_card.py MODEL.pt CARD.md "TRAIN COMMAND" [--sizes 64,128] [--big 256]
        [--families density,perm,aniso,stretch,periodic --family-seeds 1,2,3 --family-big 128]

With --families, a table per operator family as users meet it: the PETSc
DCDM KSP (default options: island deflation, m by the operator) beside CG
+ GAMG (`deepcd bench`'s options), iterations to rtol 1e-6 and one run's
set-up + solve time, at --family-n on each seed and at --family-big on seed 1
(DCDM only: GAMG takes minutes on stretch there).
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


def family_rows(model, families, n, seeds, big, threads):
    """(family, grid, seed, DCDM its, GAMG its, DCDM s, GAMG s) rows."""
    from deepcd_petsc.bench import bench
    rows = []

    def add(size, seed, solvers):
        got = bench(families, [size], solvers, seed=seed, repeats=1, model=model, threads=threads,
                    log=lambda line: print(line, flush=True))
        for fam in families:
            d = next(r for r in got if r["scene"] == fam and r["solver"] == "dcdm")
            g = next((r for r in got if r["scene"] == fam and r["solver"] == "cg+gamg"), None)
            rows.append({"family": fam, "grid": f"{size}³", "seed": seed,
                         "dcdm": d["iterations"] if d["converged"] else f"{d['iterations']} (not converged)",
                         "gamg": ("–" if g is None else g["iterations"] if g["converged"]
                                  else f"{g['iterations']} (not converged)"),
                         "dcdm_s": f"{d['setup_s']:.2f} + {d['solve_s']:.2f}",
                         "gamg_s": f"{g['setup_s']:.2f} + {g['solve_s']:.2f}" if g else "–"})
    for seed in seeds:
        add(n, seed, ["dcdm", "cg+gamg"])
    for m in big:
        add(m, seeds[0], ["dcdm"])
    rows.sort(key=lambda r: (families.index(r["family"]), r["grid"] != f"{n}³", r["seed"]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("card")
    ap.add_argument("command")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--big", default="256", help="sizes evaluated without baselines ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--families", default="", help="operator families for the per-family table")
    ap.add_argument("--family-n", type=int, default=64, help="grid of the seeds' rows (N³)")
    ap.add_argument("--family-seeds", default="1,2,3")
    ap.add_argument("--family-big", default="128", help="larger grids, DCDM only, first seed")
    a = ap.parse_args()
    fams = [f for f in a.families.split(",") if f]
    from deepcd_petsc.coefficients import FAMILIES
    if [f for f in fams if f not in FAMILIES] or (fams and not a.family_seeds.strip()):
        ap.error(f"--families: choose from {', '.join(FAMILIES)}, with --family-seeds")
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
    if fams:
        from deepcd_petsc.tables import markdown_table
        seeds = [int(s) for s in a.family_seeds.split(",")]
        big = [int(s) for s in a.family_big.split(",") if s]
        frows = family_rows(a.model, fams, a.family_n, seeds, big, a.threads)
        with open(a.card, "a") as f:
            f.write("\n## Operator families (the PETSc DCDM KSP, as `deepcd solve --scene F` assembles them)\n\n"
                    f"Iterations to ‖r‖/‖b‖ ≤ 1e-6 (true residual), `-ksp_type python -ksp_python_type "
                    f"deepcd_petsc.DCDM -ksp_dcdm_threads {a.threads}` with its default options, and "
                    "`-ksp_type cg -pc_type gamg`; one run each (`deepcd bench`'s rows, times include "
                    "warm-up), seeds the coefficients and right-hand side:\n\n")
            f.write(markdown_table(frows, ["family", "grid", "seed", "dcdm", "gamg", "dcdm_s", "gamg_s"],
                                   ["family", "grid", "seed", "DCDM its", "CG+GAMG its",
                                    "DCDM set-up + solve s", "GAMG set-up + solve s"]) + "\n")
    print(open(a.card).read())


if __name__ == "__main__":
    main()
