"""`deepcd bench`: DCDM and the network PC next to PETSc's classical solvers
on the same systems in the same run, with set-up and solve times, memory,
true residuals, DCDM's per-iteration cost breakdown, JSON + markdown + plots;
single solves, or sequences of solves that reuse the set-up (time stepping),
and for each (scene, size) DCDM's ratio to the fastest classical solver."""
import json
import os
import platform
import statistics
import time

from .solvers import BASELINES, baseline_options, baseline_unavailable, run_ksp, run_sequence
from .tables import markdown_table

NETWORK_SOLVERS = {
    "dcdm": {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM"},
    "fcg+net": {"ksp_type": "fcg", "pc_type": "python", "pc_python_type": "deepcd_petsc.NetworkPC"},
}
ALL_SOLVERS = list(NETWORK_SOLVERS) + list(BASELINES)


def solver_options(name, problem, model=None, threads=None, northo=None, kcycle=None):
    if name in NETWORK_SOLVERS:
        opts = dict(NETWORK_SOLVERS[name])
        key = "ksp_dcdm_" if name == "dcdm" else "pc_dcdm_"
        if model:
            opts[key + "model"] = model
        if threads:
            opts[key + "threads"] = str(threads)
        if northo and name == "dcdm":
            opts["ksp_dcdm_northo"] = str(northo)
        if kcycle is not None:
            opts[key + "kcycle"] = str(kcycle)
        return opts
    return baseline_options(name, problem)


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info(comm):
    import petsc4py
    import torch
    from petsc4py import PETSc
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ranks": comm.getSize(),
            "torch_threads": torch.get_num_threads(),
            "petsc": "%d.%d.%d" % PETSc.Sys.getVersion(), "petsc4py": petsc4py.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def unavailable_solvers(solvers, comm=None):
    """{name: why} for the solvers this PETSc build cannot run (a baseline
    whose preconditioner it was configured without, e.g. hypre)."""
    out = {}
    for name in solvers:
        why = baseline_unavailable(name, comm) if name in BASELINES else None
        if why:
            out[name] = why
    return out


def bench(scenes, sizes, solvers, seed=7, repeats=3, rtol=1e-6, model=None,
          threads=None, northo=None, log=print, skipped=None, solves=1, change_every=None, dim=3,
          on_row=None, kcycle=None):
    """List of result rows, one per (scene, size, solver): medians over
    `repeats` of set-up and solve time; the first repeat is a warm-up when
    repeats > 1 (imports, model load, caches). Solvers this PETSc build
    lacks are left out, logged, and added to `skipped` ({name: why}).
    solves > 1: each run is a sequence of that many solves with one KSP
    (fresh right-hand sides; a new geometry every `change_every` solves),
    rows as repeated_row() describes. `on_row(rows)` after each row: the
    caller keeps what is done if the run is interrupted."""
    from petsc4py import PETSc
    from .problem import Problem
    comm = PETSc.COMM_WORLD
    missing = unavailable_solvers(solvers, comm)
    for name, why in missing.items():
        log(f"{name}: unavailable ({why}), skipped")
    if skipped is not None:
        skipped.update(missing)
    solvers = [s for s in solvers if s not in missing]
    rows = []
    for n in sizes:
        for scene in scenes:
            t0 = time.perf_counter()
            shape = (n, n, n if dim == 3 else 1)
            problem = Problem.from_scene(scene, shape, seed=seed)
            assembly = time.perf_counter() - t0
            geometry = lambda j, scene=scene, shape=shape: Problem.from_scene(scene, shape, seed=seed + j)
            for name in solvers:
                opts = solver_options(name, problem, model, threads, northo, kcycle)
                opts["ksp_rtol"] = str(rtol)
                opts["ksp_max_it"] = "20000"
                prefix = "bench_" + name.replace("+", "_").replace("-", "_") + "_"
                if solves > 1:
                    row = repeated_row(problem, prefix, opts, repeats, solves, change_every,
                                       geometry, seed, comm)
                else:
                    row = single_row(problem, prefix, opts, repeats, comm)
                row.update(scene=scene, n=n, solver=name, seed=seed, assembly_s=assembly, dim=dim)
                rows.append(row)
                log(_log_line(row))
                if on_row is not None:
                    on_row(rows)
            problem.destroy()
    return rows


def _log_line(row):
    head = f"{row['scene']:8s} {row['n']:4d}^{row.get('dim', 3)} {row['solver']:14s} its {row['iterations']:6d} " \
           f"{row['reason']:16s} "
    if "solves" in row:
        return head + (f"first {row['first_s']:7.3f} s median {row['median_s']:7.3f} s "
                       f"amortised {row['amortised_s']:7.3f} s set-ups {row['setups']} "
                       f"res {row['true_residual']:.1e}")
    return head + (f"setup {row['setup_s']:7.3f} s solve {row['solve_s']:7.3f} s "
                   f"res {row['true_residual']:.1e}")


def _peak(comm):
    from mpi4py import MPI
    return comm.tompi4py().allreduce(_peak_mb(), op=MPI.MAX)


def single_row(problem, prefix, opts, repeats, comm):
    """One solve per run, a fresh KSP each: medians of set-up and solve
    over the timed runs, DCDM's per-iteration breakdown."""
    runs = []
    for rep in range(max(repeats, 1)):
        _reset_peak()
        res, ksp, x = run_ksp(problem, prefix, opts, keep=True, history=(rep == 0))
        res["peak_mb"] = _peak(comm)
        ctx = ksp.getPythonContext() if ksp.getType() == "python" else None
        if ctx is not None and getattr(ctx, "timing", None):
            its = max(res["iterations"], 1)
            t = ctx.timing
            res["breakdown_ms"] = {k: v / its * 1e3 for k, v in t.items()}
            # as DCDM.solve defines them (-ksp_view prints the same)
            res["overhead_pct"] = 100 * t["overhead"] / t["total"]
            res["glue_pct"] = 100 * t["glue"] / t["total"]
            res["fallbacks"] = ctx.fallbacks
        ksp.destroy()
        x.destroy()
        runs.append(res)
    timed = runs[1:] if len(runs) > 1 else runs
    row = dict(runs[0])
    row["setup_s"] = statistics.median(r["setup_s"] for r in timed)
    row["solve_s"] = statistics.median(r["solve_s"] for r in timed)
    row["peak_mb"] = max(r["peak_mb"] for r in runs)
    if "breakdown_ms" in timed[-1]:
        row["breakdown_ms"] = timed[-1]["breakdown_ms"]
        row["overhead_pct"] = timed[-1]["overhead_pct"]
        row["glue_pct"] = timed[-1]["glue_pct"]
    row.update(total_s=row["setup_s"] + row["solve_s"],
               per_it_ms=row["solve_s"] / max(row["iterations"], 1) * 1e3,
               repeats=len(timed))
    return row


# what a repeated-solve run reports: the median over timed runs of each
REPEATED_TIMES = ("first_setup_s", "first_s", "median_s", "amortised_s", "reuse_setup_s")


def repeated_row(problem, prefix, opts, repeats, solves, change_every, geometry, seed, comm):
    """Runs of `solves` solves with one KSP (solvers.run_sequence), the
    first run a warm-up when repeats > 1. first_s: set-up + solve of the
    first solve; median_s: median solve time of the others (solve only);
    amortised_s: all set-ups and solves / solves; setups: solves that set
    up a PC (PCSetUp events: 1 when the set-up is reused, 1 per geometry
    with change_every); reuse_setup_s: the slowest set-up call of a solve
    whose operator did not change (~0 when reused)."""
    runs = []
    for rep in range(max(repeats, 1)):
        _reset_peak()
        recs = run_sequence(problem, prefix, opts, solves, change_every, geometry, seed)
        runs.append(summarise(recs, change_every))
        runs[-1]["peak_mb"] = _peak(comm)
    timed = runs[1:] if len(runs) > 1 else runs
    row = dict(timed[-1])
    for key in REPEATED_TIMES:
        row[key] = statistics.median(r[key] for r in timed)
    row["peak_mb"] = max(r["peak_mb"] for r in runs)
    row.update(repeats=len(timed), ranks=comm.getSize())
    return row


def summarise(records, change_every=None):
    """One run of a solve sequence as a row (see repeated_row)."""
    first, rest = records[0], records[1:] or records[:1]
    same_op = [r for k, r in enumerate(records)
               if k and not (change_every and k % change_every == 0)]
    bad = [r for r in records if not r["converged"]]
    return {"solves": len(records), "change_every": change_every,
            "iterations": first["iterations"],
            "iterations_median": statistics.median(r["iterations"] for r in rest),
            "reason": (bad or records)[0]["reason"], "converged": not bad,
            "true_residual": max(r["true_residual"] for r in records),
            "first_setup_s": first["setup_s"], "first_s": first["setup_s"] + first["solve_s"],
            "median_s": statistics.median(r["solve_s"] for r in rest),
            "amortised_s": sum(r["setup_s"] + r["solve_s"] for r in records) / len(records),
            "reuse_setup_s": max((r["setup_s"] for r in same_op), default=0.0),
            "setups": sum(r["pc_setups"] > 0 for r in records),
            "pc_setups": [r["pc_setups"] for r in records],
            "solve_times": [r["solve_s"] for r in records],
            "setup_times": [r["setup_s"] for r in records],
            "iteration_counts": [r["iterations"] for r in records]}


# the metrics DCDM is compared on with the fastest classical solver
SINGLE_METRICS = {"total_s": "set-up + solve"}
REPEATED_METRICS = {"median_s": "per solve (median of the rest)", "amortised_s": "amortised"}


def best_classical(rows):
    """Per (scene, size) and metric: the fastest converged classical
    solver, DCDM's time and their ratio (DCDM / best: below 1 is DCDM
    faster; speed-up = its inverse)."""
    repeated = any("solves" in r for r in rows)
    metrics = REPEATED_METRICS if repeated else SINGLE_METRICS
    out = []
    for key in dict.fromkeys((r["scene"], r["n"]) for r in rows):
        sel = [r for r in rows if (r["scene"], r["n"]) == key and r.get("converged", True)]
        classical = [r for r in sel if r["solver"] in BASELINES]
        dcdm = next((r for r in sel if r["solver"] == "dcdm"), None)
        for metric, label in metrics.items():
            if not classical:
                continue
            best = min(classical, key=lambda r: r[metric])
            e = {"scene": key[0], "n": key[1], "metric": label, "best_classical": best["solver"],
                 "best_s": best[metric]}
            if dcdm is not None:
                e.update(dcdm_s=dcdm[metric], dcdm_over_best=dcdm[metric] / best[metric],
                         speedup=best[metric] / dcdm[metric])
            out.append(e)
    return out


COLUMNS = ["scene", "n", "solver", "iterations", "setup_s", "solve_s", "total_s", "per_it_ms",
           "peak_mb", "true_residual"]
HEADERS = ["scene", "n", "solver", "its", "set-up (s)", "solve (s)", "total (s)", "ms/it",
           "peak MB", "true res."]
REPEATED_COLUMNS = ["scene", "n", "solver", "iterations", "iterations_median", "first_setup_s",
                    "first_s", "median_s", "amortised_s", "setups", "reuse_setup_s", "peak_mb",
                    "true_residual"]
REPEATED_HEADERS = ["scene", "n", "solver", "its (1st)", "its (rest)", "1st set-up (s)",
                    "1st total (s)", "solve (s, median of rest)", "amortised (s)", "set-ups",
                    "reused set-up (s)", "peak MB", "max true res."]
BEST_COLUMNS = ["scene", "n", "metric", "best_classical", "best_s", "dcdm_s", "dcdm_over_best",
                "speedup"]
BEST_HEADERS = ["scene", "n", "time", "fastest classical", "its time (s)", "DCDM (s)",
                "DCDM / best", "speed-up"]


def _results_table(rows):
    if any("solves" in r for r in rows):
        r0 = rows[0]
        every = r0["change_every"]
        title = (f"{r0['solves']} solves per run, fresh right-hand sides, "
                 + (f"a new geometry every {every} solves:" if every else "one operator:"))
        return [title, "", markdown_table(rows, REPEATED_COLUMNS, REPEATED_HEADERS), ""]
    return [markdown_table(rows, COLUMNS, HEADERS), ""]


def write_report(rows, info, out_dir, command, unavailable=None, plots=True, interrupted=False):
    """bench.json, bench.md and (with `plots`) the PNGs; rewritten after
    every row, so an interrupted run keeps its finished rows."""
    os.makedirs(out_dir, exist_ok=True)
    unavailable = dict(unavailable or {})
    best = best_classical(rows)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump({"machine": info, "command": command, "results": rows,
                   "best_classical": best, "unavailable": unavailable,
                   **({"interrupted": True} if interrupted else {})}, f, indent=1)
    lines = [f"Command: `{command}`", "",
             f"Machine: {info['cpu']}, {info['ranks']} rank(s) x {info['torch_threads']} torch thread(s), "
             f"PETSc {info['petsc']}, torch {info['torch']}, {info['date']}", ""]
    if interrupted:
        lines += ["Interrupted: the rows finished before the interrupt.", ""]
    lines += _results_table(rows)
    if best:
        lines += ["DCDM against the fastest classical solver:", "",
                  markdown_table([dict(e, speedup=f"{e['speedup']:.1f}x") if "speedup" in e else e
                                  for e in best], BEST_COLUMNS, BEST_HEADERS), ""]
    if unavailable:
        lines += ["Unavailable in this PETSc build: " +
                  "; ".join(f"{k} ({v})" for k, v in unavailable.items()), ""]
    br = [dict(scene=r["scene"], n=r["n"], **{k: round(v, 2) for k, v in r["breakdown_ms"].items()})
          for r in rows if "breakdown_ms" in r]
    if br:
        keys = ["total", "network", "forward", "halo", "matmult", "orthogonalise", "other",
                "overhead"]
        lines += ["DCDM cost per iteration (ms):", "",
                  markdown_table(br, ["scene", "n"] + keys), ""]
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write("\n".join(lines))
    plots = plot(rows, out_dir) if plots and any(r.get("history") for r in rows) else []
    return "\n".join(lines), plots


def plot(rows, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for key in sorted({(r["scene"], r["n"]) for r in rows}):
        sel = [r for r in rows if (r["scene"], r["n"]) == key and r.get("history")]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for r in sel:
            h = r["history"]
            a1.semilogy(range(len(h)), h, label=r["solver"])
            t = r.get("times") or []
            if len(t) == len(h):
                a2.semilogy([r["setup_s"] + v for v in t], h, label=r["solver"])
        a1.set_xlabel("iteration")
        a2.set_xlabel("time incl. set-up (s)")
        for a in (a1, a2):
            a.set_ylabel("‖r‖/‖b‖")
            a.grid(True, which="both", alpha=0.3)
        a1.legend(fontsize=8)
        fig.suptitle(f"{key[0]} {key[1]}³")
        fig.tight_layout()
        p = os.path.join(out_dir, f"residuals_{key[0]}_{key[1]}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths
