"""`deepcd` command line: solve | info (train, evaluate, bench come with
their issues). Our options are --long; every -single-dash token goes to
PETSc's options database unchanged."""
import argparse
import json
import os
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
                   help="box | smoke | spheres | liquid | file (default spheres)")
    p.add_argument("--n", help="cubic grid size N (N×N×N cells)")
    p.add_argument("--shape", help="grid NX,NY,NZ (non-cubic)")
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
    s.add_argument("--save-solution", help="write the solution as .npy (nz, ny, nx) from rank 0")
    sub.add_parser("info", help="versions, threads and devices")
    return ap


def _problem_from_args(a):
    from .problem import Problem, parse_shape
    from .scenes import parse_faces
    shape = _shape_from_args(a)
    try:
        seed = int(a.seed)
    except ValueError:
        raise UserError(f"--seed {a.seed!r} is not an integer") from None
    scene = "file" if a.flags and a.scene in ("spheres", "file") else a.scene
    return Problem.from_scene(scene, shape, seed=seed, flags_file=a.flags,
                              open_faces=parse_faces(a.open), rhs_file=a.rhs)


def _shape_from_args(a):
    from .problem import parse_shape
    import numpy as np
    if a.n is None and a.shape is None and a.flags:
        try:
            nz, ny, nx = np.load(a.flags, mmap_mode="r").shape
            return (nx, ny, nz)
        except Exception:
            pass  # load_flags reports the problem precisely
    return parse_shape(a.n, a.shape)


def init_petsc(petsc_args):
    import petsc4py
    petsc4py.init([sys.argv[0]] + petsc_args)
    from petsc4py import PETSc
    return PETSc


def cmd_solve(a, petsc_args):
    PETSc = init_petsc(petsc_args)
    from .solvers import run_ksp
    comm = PETSc.COMM_WORLD
    rank = comm.getRank()
    t0 = time.perf_counter()
    problem = _problem_from_args(a)
    comm.barrier()
    assembly = time.perf_counter() - t0
    try:
        res, ksp, x = run_ksp(problem, keep=True)
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
        print(f"  solve           {res['solve_s']:.3f} s")
        if a.json:
            print(json.dumps(res))
        sys.stdout.flush()
    return 0 if res["converged"] else 1


def cmd_info(a, petsc_args):
    PETSc = init_petsc(petsc_args)
    import numpy
    import petsc4py
    lines = [("PETSc", "%d.%d.%d" % PETSc.Sys.getVersion()),
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
        lines += [("torch", torch.__version__),
                  ("torch threads", str(torch.get_num_threads())),
                  ("devices", ", ".join(dev))]
    except ImportError:
        lines.append(("torch", "not installed"))
    lines.append(("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "(unset)")))
    if PETSc.COMM_WORLD.getRank() == 0:
        for k, v in lines:
            print(f"{k:16s} {v}")
    return 0


COMMANDS = {"solve": cmd_solve, "info": cmd_info}


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
