"""`deepcd bench`: DCDM and the network PC next to PETSc's classical solvers
on the same systems in the same run, with set-up and solve times, memory,
true residuals, DCDM's per-iteration cost breakdown, JSON + markdown + plots."""
import json
import os
import platform
import statistics
import time

from .solvers import BASELINES, baseline_options, baseline_unavailable, run_ksp
from .tables import markdown_table

NETWORK_SOLVERS = {
    "dcdm": {"ksp_type": "python", "ksp_python_type": "deepcd_petsc.DCDM"},
    "fcg+net": {"ksp_type": "fcg", "pc_type": "python", "pc_python_type": "deepcd_petsc.NetworkPC"},
}
ALL_SOLVERS = list(NETWORK_SOLVERS) + list(BASELINES)


def solver_options(name, problem, model=None, threads=None, northo=None):
    if name in NETWORK_SOLVERS:
        opts = dict(NETWORK_SOLVERS[name])
        key = "ksp_dcdm_" if name == "dcdm" else "pc_dcdm_"
        if model:
            opts[key + "model"] = model
        if threads:
            opts[key + "threads"] = str(threads)
        if northo and name == "dcdm":
            opts["ksp_dcdm_northo"] = str(northo)
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
          threads=None, northo=None, log=print, skipped=None):
    """List of result rows, one per (scene, size, solver): medians over
    `repeats` of set-up and solve time; the first repeat is a warm-up when
    repeats > 1 (imports, model load, caches). Solvers this PETSc build
    lacks are left out, logged, and added to `skipped` ({name: why})."""
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
            problem = Problem.from_scene(scene, (n, n, n), seed=seed)
            assembly = time.perf_counter() - t0
            for name in solvers:
                opts = solver_options(name, problem, model, threads, northo)
                opts["ksp_rtol"] = str(rtol)
                opts["ksp_max_it"] = "20000"
                prefix = "bench_" + name.replace("+", "_") + "_"
                runs = []
                for rep in range(max(repeats, 1)):
                    _reset_peak()
                    res, ksp, x = run_ksp(problem, prefix, opts, keep=True, history=(rep == 0))
                    res["peak_mb"] = comm.tompi4py().allreduce(_peak_mb(), op=__import__("mpi4py").MPI.MAX)
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
                row.update(scene=scene, n=n, solver=name, seed=seed, assembly_s=assembly,
                           total_s=row["setup_s"] + row["solve_s"],
                           per_it_ms=row["solve_s"] / max(row["iterations"], 1) * 1e3,
                           repeats=len(timed))
                rows.append(row)
                log(f"{scene:8s} {n:4d}^3 {name:10s} its {row['iterations']:6d} {row['reason']:16s} "
                    f"setup {row['setup_s']:7.3f} s solve {row['solve_s']:7.3f} s "
                    f"res {row['true_residual']:.1e}")
            problem.destroy()
    return rows


COLUMNS = ["scene", "n", "solver", "iterations", "setup_s", "solve_s", "total_s", "per_it_ms",
           "peak_mb", "true_residual"]
HEADERS = ["scene", "n", "solver", "its", "set-up (s)", "solve (s)", "total (s)", "ms/it",
           "peak MB", "true res."]


def write_report(rows, info, out_dir, command, unavailable=None):
    os.makedirs(out_dir, exist_ok=True)
    unavailable = dict(unavailable or {})
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump({"machine": info, "command": command, "results": rows,
                   "unavailable": unavailable}, f, indent=1)
    lines = [f"Command: `{command}`", "",
             f"Machine: {info['cpu']}, {info['ranks']} rank(s) x {info['torch_threads']} torch thread(s), "
             f"PETSc {info['petsc']}, torch {info['torch']}, {info['date']}", "",
             markdown_table(rows, COLUMNS, HEADERS), ""]
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
    plots = plot(rows, out_dir)
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
