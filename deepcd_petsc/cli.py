"""`deepcd` command line: solve | info | kernels (train, evaluate, bench
come with their issues). Our options are --long; every -single-dash token goes to
PETSc's options database unchanged."""
import argparse
import json
import os
import shlex
import sys
import time

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UserError(f"{self.prog}: {message}")


def _split_argv(argv):
    """(our args, PETSc args): a token belongs to PETSc when it starts with a
    single dash and is not a negative number, and so do the values after it."""
    ours, petsc = [], []
    cur = ours
    for tok in argv:
        if tok.startswith("--"):
            cur = ours
        elif tok.startswith("-") and len(tok) > 1 and not _is_number(tok):
            cur = petsc
        cur.append(tok)
    return ours, petsc


def _is_number(tok):
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _add_problem_args(p):
    p.add_argument("--scene", default="spheres",
                   help="box | smoke | spheres | liquid | file, or an operator family: density | perm | "
                        "aniso | stretch | periodic (default spheres)")
    p.add_argument("--n", help="cubic grid size N (N×N×N cells; N×N with --dim 2)")
    p.add_argument("--shape", help="grid NX,NY,NZ (non-cubic), or NX,NY: a 2D grid")
    p.add_argument("--dim", type=int, default=None, choices=[2, 3],
                   help="2: a 2D grid (2D DMDA, 5-point operator, y up); default 3, or 2 for --shape NX,NY")
    p.add_argument("--seed", default="0", help="scene and right-hand-side seed")
    p.add_argument("--flags", help="cell flags .npy, int (nz, ny, nx): 0 fluid, 1 solid, 2 air")
    p.add_argument("--rhs", help="right-hand side .npy, float (nz, ny, nx)")
    p.add_argument("--open", help="open faces, e.g. z+ or x-,x+ or none (default: the scene's)")


def build_parser():
    ap = _Parser(prog="deepcd", description="Deep Conjugate Direction Method in PETSc")
    sub = ap.add_subparsers(dest="cmd", parser_class=_Parser)
    s = sub.add_parser("solve", help="build a scene and solve it with any PETSc KSP/PC",
                       description="Extra -options go to PETSc, e.g. -ksp_type cg -pc_type gamg.")
    _add_problem_args(s)
    s.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    s.add_argument("--solves", type=int, default=1,
                   help="solve N times with the same KSP (as time stepping does); report the median")
    s.add_argument("--save-solution", help="write the solution as .npy (nz, ny, nx) from rank 0")
    sub.add_parser("info", help="versions, threads and devices")
    k = sub.add_parser("kernels", help="the CPU kernels: which file is loaded and whether it is "
                                       "trusted, or install a shared copy",
                       description="Without options: the kernel cache, whether it and this "
                                   "node's library are trusted, and what is loaded.")
    k.add_argument("--install", metavar="DIR",
                   help="build (or take the trusted cached) library for this node's CPU and "
                        "compiler, copy it with its .sha256 record into DIR (0644, DIR 0755), "
                        "check DIR is trusted and print the DEEPCD_KERNEL_DIR line")
    t = sub.add_parser("train", help="train a DCDM network (unsupervised, Lanczos Ritz data)")
    t.add_argument("--out", required=True, help="checkpoint to write (.pt); also writes .png loss plot and .md card")
    t.add_argument("--n", default="32", help="training grid size(s) N (N³ grids), comma list, e.g. "
                                             "32,48; empty ('') with --n2d for a 2D-only model")
    t.add_argument("--n2d", default="", help="also 2D N×N training grids (the scenes' 2D versions, "
                                              "5-point operators), comma list, e.g. 64,128")
    t.add_argument("--scenes", default="spheres,smoke,liquid,box",
                   help="training scenes, comma list (flag scenes and operator families)")
    t.add_argument("--geometries", default="4", help="random geometries per scene and size (one count, or one per size)")
    t.add_argument("--lanczos", default="400", help="Lanczos steps per geometry (one count, or one per size)")
    t.add_argument("--steps", type=int, default=2000,
                   help="optimiser steps (default 2000; 0: build the --cache only)")
    t.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    t.add_argument("--batch", type=int, default=8, help="Ritz vectors per step (default 8)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed of geometries, data and weights")
    t.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:N]")
    t.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t.add_argument("--cache", help="directory caching the Lanczos data (.npz per geometry)")
    t.add_argument("--resume", action="store_true", help="continue from --out's training state")
    t.add_argument("--init", help="start from this model's architecture and weights (fine-tuning)")
    t.add_argument("--deflate", type=int, default=0, metavar="B",
                   help="train on what the DCDM KSP asks of the network: deflate the operator "
                        "families' islands (and boxes of B cells a side beside them, as "
                        "-ksp_dcdm_deflate_box) in the loss; 0 (default): the plain loss")
    t.add_argument("--arch", default="vcycle", choices=["vcycle", "unet"],
                   help="network: the V-cycle network (default) or the U-Net of the first releases")
    t.add_argument("--channels", help="U-Net only: channels per level, finest first, e.g. 4,8,16,16,16")
    t.add_argument("--eval-sizes", default="32,64", help="N³ sizes for the model card's evaluation")
    t.add_argument("--eval-sizes-2d", help="N² sizes for the model card's evaluation "
                                           "(default 128 when training with --n2d, else none)")
    t.add_argument("--no-card", action="store_true", help="skip the evaluation, plot and card")
    e = sub.add_parser("evaluate", help="DCDM vs CG iterations with a model (torch, no PETSc)")
    e.add_argument("--model", help="checkpoint (default: the shipped model for --dim: default.pt or default2d.pt)")
    e.add_argument("--scenes", default="spheres,smoke,liquid", help="scenes, comma list")
    e.add_argument("--sizes", default="32,64", help="grid sizes N (N³, or N² with --dim 2), comma list")
    e.add_argument("--dim", type=int, default=3, choices=[2, 3],
                   help="2: N×N grids (the scenes' 2D versions, 5-point operators)")
    e.add_argument("--seeds", default="1,2", help="geometry seeds, comma list (the shipped model "
                                                 "was trained on 1000-1002)")
    e.add_argument("--rtol", type=float, default=1e-6, help="relative residual tolerance")
    e.add_argument("--maxit", type=int, default=500, help="iteration limit per solve")
    e.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:N]")
    e.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"],
                   help="the network's dtype (the Krylov arithmetic stays float64)")
    e.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    e.add_argument("--no-baselines", action="store_true", help="skip CG and CG+Jacobi")
    e.add_argument("--northo", type=int, help="directions to A-orthogonalise against (default 2)")
    e.add_argument("--kcycle", type=int, help="finest levels with a K-cycle (default: DCDM's, 1 in 2D "
                                               "and 0 in 3D; 0: the V-cycle)")
    e.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    bp = sub.add_parser("bench", help="DCDM vs PETSc's classical solvers: tables, JSON, plots")
    bp.add_argument("--scenes", default="spheres,liquid", help="scenes, comma list")
    bp.add_argument("--sizes", default="32,64", help="cubic grid sizes N, comma list")
    bp.add_argument("--dim", type=int, default=3, choices=[2, 3],
                    help="2: N×N grids (2D DMDA, 5-point operators, the scenes' 2D versions)")
    bp.add_argument("--solvers", default="dcdm,fcg+net,cg,cg+jacobi,cg+icc,cg+gamg,cg+hypre,cg+mg,"
                                         "cg+gamg-tuned,cg+hypre-tuned,cg+mg-tuned",
                    help="solvers, comma list (the README lists each one's PETSc options)")
    bp.add_argument("--seed", type=int, default=7,
                    help="geometry seed; right-hand side k of --solves uses seed + k")
    bp.add_argument("--repeats", type=int, default=3, help="runs per solver; the first is a warm-up when > 1")
    bp.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance on the true residual")
    bp.add_argument("--solves", type=int, default=1,
                    help="solves per run with one KSP and fresh right-hand sides (set-up reused, "
                         "as time stepping does); reports the first and the median of the rest")
    bp.add_argument("--change-every", type=int, metavar="K",
                    help="with --solves: a new geometry (seed + 1, + 2, ...) every K solves, as "
                         "moving obstacles do; its set-up is redone and amortised")
    bp.add_argument("--model", help="checkpoint (default: the shipped model)")
    bp.add_argument("--threads", type=int, help="torch threads per rank")
    bp.add_argument("--northo", type=int, help="DCDM's A-orthogonalised directions")
    bp.add_argument("--kcycle", type=int, help="finest levels with a K-cycle for dcdm and the network "
                                                "PCs (default: 1 in 2D, 0 in 3D)")
    bp.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md, PNGs")
    from .simulate import add_parser as add_simulate
    add_simulate(sub)
    return ap


def _problem_from_args(a):
    from .problem import Problem
    from .scenes import parse_faces
    shape = _shape_from_args(a)
    try:
        seed = int(a.seed)
    except ValueError:
        raise UserError(f"--seed {a.seed!r} is not an integer") from None
    if a.flags and a.scene not in ("spheres", "file"):
        raise UserError(f"--flags gives the geometry: use --scene file (not {a.scene!r}), "
                        "and --open to open faces")
    scene = "file" if a.flags else a.scene
    return Problem.from_scene(scene, shape, seed=seed, flags_file=a.flags,
                              open_faces=parse_faces(a.open), rhs_file=a.rhs)


def _shape_from_args(a):
    from .problem import parse_shape
    from .scenes import load_flags
    if a.n is None and a.shape is None and a.flags:
        nz, ny, nx = load_flags(a.flags, None).shape  # reports a bad file precisely
        return (nx, ny, nz)
    dim = a.dim or (2 if a.shape is not None and len(str(a.shape).split(",")) == 2 else 3)
    return parse_shape(a.n, a.shape, dim)


def init_petsc(petsc_args):
    from . import errors
    errors.CALLER_REPORTS = True   # petsc_errors() prints them as one line
    import petsc4py
    petsc4py.init([sys.argv[0]] + petsc_args)
    from petsc4py import PETSc
    return PETSc


def cmd_solve(a, petsc_args):
    if a.save_solution:
        d = os.path.dirname(os.path.abspath(a.save_solution))
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise UserError(f"--save-solution {a.save_solution!r}: directory {d!r} does not exist or is not writable")
    PETSc = init_petsc(petsc_args)
    from .solvers import run_ksp
    comm = PETSc.COMM_WORLD
    rank = comm.getRank()
    t0 = time.perf_counter()
    problem = _problem_from_args(a)
    comm.barrier()
    assembly = time.perf_counter() - t0
    try:
        if a.solves < 1:
            raise UserError(f"--solves must be >= 1, got {a.solves}")
        res, ksp, x = run_ksp(problem, keep=True, solves=a.solves)
        try:
            if a.save_solution:
                arr = problem.to_natural(x)
                if rank == 0:
                    import numpy as np
                    np.save(a.save_solution, arr)
        finally:
            ksp.destroy()
            x.destroy()
    finally:
        problem.destroy()
    nx, ny, nz = problem.shape
    res.update(scene=a.scene, shape=[nx, ny, nz], assembly_s=assembly)
    if rank == 0:
        print(f"scene {a.scene} {nx}x{ny}x{nz} on {res['ranks']} rank(s): "
              f"{res['ksp_type']} + {res['pc_type']}")
        print(f"  iterations      {res['iterations']}")
        print(f"  reason          {res['reason']}")
        print(f"  true residual   {res['true_residual']:.3e}  (||b-Ax||/||b||)")
        print(f"  assembly        {assembly:.3f} s")
        print(f"  set-up          {res['setup_s']:.3f} s")
        print(f"  solve           {res['solve_s']:.3f} s"
              + (f"  (median of {a.solves}; first {res['solve_times'][0]:.3f} s)"
                 if a.solves > 1 else ""))
        if a.json:
            print(json.dumps(res))
        sys.stdout.flush()
    return 0 if res["converged"] else 1


def cmd_info(a, petsc_args):
    PETSc = init_petsc(petsc_args)
    import numpy
    import petsc4py
    from .petsc_compat import pc_type_available
    lines = [("PETSc", "%d.%d.%d" % PETSc.Sys.getVersion()),
             ("PETSc build", f"{numpy.dtype(PETSc.IntType).itemsize * 8}-bit indices, "
                             f"{numpy.dtype(PETSc.ScalarType)} scalars, hypre "
                             f"{'yes' if pc_type_available('hypre') else 'no'}"),
             ("petsc4py", petsc4py.__version__),
             ("numpy", numpy.__version__)]
    try:
        from mpi4py import MPI
        lines += [("mpi4py", __import__("mpi4py").__version__),
                  ("MPI", MPI.Get_library_version().splitlines()[0].strip()),
                  ("ranks", str(MPI.COMM_WORLD.Get_size()))]
    except ImportError:
        lines.append(("mpi4py", "not installed"))
    try:
        import torch
        dev = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}"
                         for i in range(torch.cuda.device_count())]
        from . import kernels
        lines += [("torch", torch.__version__),
                  ("torch threads", str(torch.get_num_threads())),
                  ("devices", ", ".join(dev)),
                  ("CPU kernels", kernels.status())]   # compiles them on first use
        try:
            import triton
            lines.append(("GPU kernels", f"Triton {triton.__version__} (float32 networks on CUDA)"))
        except ImportError:
            lines.append(("GPU kernels", "Triton not installed: networks on CUDA run through torch"))
    except ImportError:
        lines.append(("torch", "not installed"))
    lines.append(("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "(unset)")))
    try:
        from .model import ModelFileError, default_model_path, load_model
        for dim in (3, 2):
            what = f"default model {dim}D"
            try:
                net, ck = load_model(default_model_path(dim))
            except ModelFileError as e:
                lines.append((what, f"unusable: {e}"))
                continue
            meta = ck.get("meta", {})
            sizes = " and ".join(t for t in (f"{meta['n']} (3D)" if meta.get("n") else "",
                                             f"{meta['n2d']} (2D)" if meta.get("n2d") else "") if t)
            lines += [(what, default_model_path(dim)),
                      ("  network", f"{net.describe()}, {net.n_params()} parameters"),
                      ("  trained", f"{meta.get('steps')} steps on {meta.get('scenes')} at sizes "
                                    f"{sizes}, source {meta.get('revision')}")]
    except ImportError as e:
        lines.append(("default model", f"unusable: {e}"))
    if PETSc.COMM_WORLD.getRank() == 0:
        for k, v in lines:
            print(f"{k:16s} {v}")
    return 0


def cmd_kernels(a, petsc_args):
    from . import kernels
    if petsc_args:
        raise UserError(f"kernels takes no PETSc options: {' '.join(petsc_args)}")
    if not a.install:
        for k, v in kernels.report():
            print(f"{k:16s} {v}")
        return 0
    try:
        path = kernels.install(a.install)
    except OSError as e:
        raise UserError(f"kernels --install {a.install}: {e.strerror}"
                        + (f": {e.filename}" if e.filename else "")) from None
    except (RuntimeError, kernels.Untrusted) as e:
        raise UserError(f"kernels --install {a.install}: {e}") from None
    print(f"installed {path} and its {kernels.record_path(path).name}")
    if os.geteuid() != 0:
        print(f"owned by uid {os.geteuid()}: only your own jobs trust it (others need a "
              "root-owned copy)")
    print(f"export DEEPCD_KERNEL_DIR={shlex.quote(str(path.parent))}")
    return 0


def _ints(text, what):
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r}: expected a comma list of integers") from None
    if not vals:
        raise UserError(f"{what} is empty")
    return vals


def _flags_only_check(unet, scenes):
    """The U-Net reads cell flags only: the operator families need the
    V-cycle network."""
    from .scenes import FAMILY_SCENES
    fam = [s for s in scenes if s in FAMILY_SCENES]
    if unet and fam:
        raise UserError(f"the U-Net reads cell flags only; scenes {', '.join(fam)} need the "
                        "V-cycle network (--arch vcycle)")


def _scenes(text):
    from .scenes import FAMILY_SCENES, GENERATORS
    known = list(GENERATORS) + list(FAMILY_SCENES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in known]
    if bad or not names:
        raise UserError(f"unknown scene(s) {bad}; choose from {', '.join(known)}")
    return names


def _device(name):
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA device")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device {name!r}; use cpu or cuda[:N]")
    return name


def _int_or_list(text, what):
    """One count, or one per training size."""
    vals = _ints(text, what)
    return vals[0] if len(vals) == 1 else vals


def cmd_train(a, petsc_args):
    import torch
    from .training.trainer import train, loss_plot, write_model_card
    from .evaluate import evaluate
    from .mgnet import DEFAULT_MG_CONFIG
    from .model import ModelFileError, DEFAULT_CONFIG
    if a.threads:
        torch.set_num_threads(a.threads)
    from .memory import tune_malloc
    tune_malloc()
    sizes = _ints(a.n, "--n") if a.n.strip() or not a.n2d.strip() else []
    sizes2 = _ints(a.n2d, "--n2d") if a.n2d.strip() else []
    if min(sizes + sizes2) < 8:
        raise UserError("training sizes must be >= 8")
    if a.steps < 0:
        raise UserError(f"--steps must be >= 0 (0: build the --cache only), got {a.steps}")
    if a.steps == 0 and not a.cache:
        raise UserError("--steps 0 builds the Lanczos data cache only: give --cache DIR")
    if a.deflate < 0:
        raise UserError(f"--deflate must be >= 0 (a box size; 0: the plain loss), got {a.deflate}")
    config = dict(DEFAULT_MG_CONFIG) if a.arch == "vcycle" else dict(DEFAULT_CONFIG)
    if a.channels and a.arch != "unet":
        raise UserError("--channels applies to --arch unet only")
    if a.channels:
        config["channels"] = _ints(a.channels, "--channels")
    _flags_only_check(a.arch == "unet" and not a.init, _scenes(a.scenes))
    try:
        net, meta = train(a.out, n=(sizes if len(sizes) != 1 else sizes[0]) if sizes else None,
                          n2d=sizes2, scenes=_scenes(a.scenes),
                          steps=a.steps, time_budget=a.time_budget, seed=a.seed,
                          lanczos=_int_or_list(a.lanczos, "--lanczos"),
                          geometries=_int_or_list(a.geometries, "--geometries"), batch=a.batch,
                          lr=a.lr, device=_device(a.device), cache=a.cache,
                          resume=a.resume, config=config, init=a.init, deflate=a.deflate)
    except (ModelFileError, ValueError) as e:
        raise UserError(str(e)) from None
    if net is None:
        print(f"--steps 0: the Lanczos data of {meta['geometries']} geometries is in {a.cache} "
              f"({meta['data_s']:.0f} s); {a.out} not written")
        return 0
    last = meta["losses"][-100:]
    print(f"wrote {a.out} after {meta['steps']} steps, final loss {sum(last) / len(last):.4f}")
    if a.no_card:
        return 0
    base = os.path.splitext(a.out)[0]
    loss_plot(meta["losses"], base + ".png")
    net = net.to("cpu").eval()
    rows = evaluate(net, ["spheres", "smoke", "liquid"], _ints(a.eval_sizes, "--eval-sizes"), [1]) \
        if a.eval_sizes.strip() else []
    ev2 = a.eval_sizes_2d if a.eval_sizes_2d is not None else ("128" if meta.get("n2d") else "")
    if ev2.strip():
        rows += evaluate(net, ["spheres", "smoke", "liquid"], _ints(ev2, "--eval-sizes-2d"), [1], dim=2)
    cmd = "deepcd " + shlex.join(sys.argv[1:])
    write_model_card(base + ".md", a.out, meta, rows, cmd)
    print(f"wrote {base}.png and {base}.md")
    return 0


def cmd_evaluate(a, petsc_args):
    import torch
    from .evaluate import evaluate
    from .model import DTYPES, ModelFileError, default_model_path, load_model
    from .tables import markdown_table
    if a.threads:
        torch.set_num_threads(a.threads)
    from .memory import tune_malloc
    tune_malloc()
    device = _device(a.device)
    try:
        net, ck = load_model(a.model or default_model_path(a.dim), dtype=a.dtype, device=device)
    except ModelFileError as e:
        raise UserError(str(e)) from None
    sizes = _ints(a.sizes, "--sizes")
    if min(sizes) < 4:
        raise UserError("sizes must be >= 4")
    _check_kcycle(a.kcycle)
    from .mgnet import MGNet
    _flags_only_check(not isinstance(net, MGNet), _scenes(a.scenes))

    def show(row):
        print(f"  {row['scene']:8s} {row['grid']:>6s} seed={row['seed']}: DCDM {row['dcdm']}"
              + (f", CG {row['cg']}, CG+Jacobi {row['cg_jacobi']}" if "cg" in row else ""), flush=True)
    rows = evaluate(net, _scenes(a.scenes), sizes, _ints(a.seeds, "--seeds"), a.rtol, a.maxit,
                    device, DTYPES[a.dtype], baselines=not a.no_baselines, progress=show,
                    dim=a.dim, kcycle=a.kcycle, **({"northo": a.northo} if a.northo is not None else {}))
    cols = ["scene", "grid", "seed", "dcdm", "dcdm_s"] + ([] if a.no_baselines else ["cg", "cg_jacobi"])
    print(markdown_table(rows, cols))
    if a.json:
        print(json.dumps(rows))
    return 0


def _check_kcycle(k):
    if k is not None and k < 0:
        raise UserError(f"--kcycle must be >= 0 (0: the V-cycle), got {k}")


def _check_solves(solves, change_every):
    """--solves N >= 1; --change-every K needs 1 <= K < N (else the operator never changes)."""
    if solves < 1:
        raise UserError(f"--solves must be >= 1, got {solves}")
    if change_every is not None and not 1 <= change_every < solves:
        raise UserError(f"--change-every must be >= 1 and below --solves ({solves}), "
                        f"got {change_every}")


def cmd_bench(a, petsc_args):
    PETSc = init_petsc(petsc_args)
    from .bench import ALL_SOLVERS, bench, machine_info, write_report
    solvers = [s.strip() for s in a.solvers.split(",") if s.strip()]
    bad = [s for s in solvers if s not in ALL_SOLVERS]
    if bad or not solvers:
        raise UserError(f"unknown solver(s) {bad}; choose from {', '.join(ALL_SOLVERS)}")
    _check_kcycle(a.kcycle)
    _check_solves(a.solves, a.change_every)
    if a.model:
        from .model import ModelFileError, read_checkpoint
        try:
            read_checkpoint(a.model)
        except ModelFileError as e:
            raise UserError(str(e)) from None
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    from .memory import tune_malloc
    tune_malloc()      # before any solver, so all run under the same allocator settings
    rank = PETSc.COMM_WORLD.getRank()
    skipped = {}
    cmd = "deepcd " + shlex.join(sys.argv[1:])
    size = PETSc.COMM_WORLD.getSize()
    if size > 1:
        cmd = f"mpiexec -n {size} " + cmd
    info = machine_info(PETSc.COMM_WORLD)
    done = []

    def keep(rows):
        # after every row: an interrupted or failed run keeps what it measured
        done[:] = rows
        if rank == 0:
            write_report(rows, info, a.out, cmd, skipped, plots=False)

    try:
        bench(_scenes(a.scenes), _ints(a.sizes, "--sizes"), solvers, a.seed, a.repeats,
              a.rtol, a.model, a.threads, a.northo,
              log=(lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None),
              skipped=skipped, solves=a.solves, change_every=a.change_every, dim=a.dim,
              on_row=keep, kcycle=a.kcycle)
    except BaseException as e:      # an interrupt inside DCDM comes as a PETSc.Error
        from .errors import original_error
        if not isinstance(original_error(e), KeyboardInterrupt):
            raise
        if rank == 0:
            write_report(done, info, a.out, cmd, skipped, interrupted=True)
            print(f"interrupted: kept the {len(done)} finished row(s) in {a.out}/bench.json and bench.md",
                  file=sys.stderr)
        return 130
    if rank == 0:
        text, plots = write_report(done, info, a.out, cmd, skipped)
        print(text)
        print(f"wrote {a.out}/bench.json, bench.md and {len(plots)} plot(s)")
    return 0


def cmd_simulate(a, petsc_args):
    from .simulate import run
    return run(a, petsc_args)


COMMANDS = {"simulate": cmd_simulate, "bench": cmd_bench, "solve": cmd_solve, "info": cmd_info, "train": cmd_train,
            "evaluate": cmd_evaluate, "kernels": cmd_kernels}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, petsc_args = _split_argv(argv)
    try:
        a = build_parser().parse_args(ours)
        if a.cmd is None:
            build_parser().print_help()
            return 2
        return COMMANDS[a.cmd](a, petsc_args)
    except UserError as e:
        if _rank() == 0:
            print(f"deepcd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _rank():
    try:
        from petsc4py import PETSc
        return PETSc.COMM_WORLD.getRank()
    except Exception:
        return int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", 0)))


if __name__ == "__main__":
    sys.exit(main())
