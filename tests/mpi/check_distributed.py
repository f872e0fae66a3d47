"""Run under mpiexec: the distributed network evaluation equals the serial
one, in float32 and float64, on uneven and forced DMDA decompositions and a
grid with the network's smallest depth; and the geometry
derived from the operator in parallel equals the serial one.

    mpiexec -n 3 python tests/mpi/check_distributed.py [--big]

Rank 0 prints one line per case,
    CASE <ranks> <nx>x<ny>x<nz> <scene> <dmda procs> <dtype> <max rel diff> <active>/<ranks> direct|scatter
"OK geometry ..." per geometry check, and "OK <ranks>" when everything
passed (exit 0); otherwise "FAILED ..." and exit 1.
"""
import argparse
import sys
import traceback

from mpisetup import PETSc, comm, finish, mpi, rank, size  # noqa: E402,F401
import numpy as np  # noqa: E402
from deepcd_petsc.context import geometry_from_operator  # noqa: E402
from deepcd_petsc.evaluator import NetworkEvaluator, _gather_rule  # noqa: E402
from deepcd_petsc.halo import Decomposition  # noqa: E402
from deepcd_petsc.model import DTYPES, dirichlet_fraction, load_model  # noqa: E402
from deepcd_petsc.problem import Problem  # noqa: E402
TOL = {"float32": 1e-5, "float64": 1e-12}
SCALE = 0.37   # a non-unit input scale, as DCDM passes 1/||r||


def field(shape_xyz, seed):
    """The same random (nz, ny, nx) input on every rank."""
    nx, ny, nz = shape_xyz
    return np.random.default_rng([seed, nx, ny, nz]).standard_normal((nz, ny, nx))


def local_block(p, arr):
    (xs, xe), (ys, ye), (zs, ze) = p.box
    return arr[zs:ze, ys:ye, xs:xe]


def evaluate(net, dtype, p, x_global):
    """(output in natural ordering on rank 0, evaluator decomposition)."""
    flags = p.local_flags
    dirichlet = local_block(p, dirichlet_fraction(p.flags, p.open_faces))
    ev = NetworkEvaluator(net, p.da, flags, dirichlet, DTYPES[dtype])
    if ev.dec is not None and ev.dec.active:
        # the coarsest level is gathered (one allgather, computed as serially)
        assert ev.geo["levels"][-1]["gathered"] and not ev.geo["levels"][0]["gathered"]
    x = p.da.createGlobalVec()
    y = x.duplicate()
    try:
        with x as xa:
            xa.reshape(flags.shape)[...] = local_block(p, x_global)
        y.set(np.nan)   # every entry must be written
        ev.apply(x, y, scale=SCALE)
        # the input is untouched
        assert np.array_equal(x.getArray().reshape(flags.shape), local_block(p, x_global))
        return p.to_natural(y), ev.dec, getattr(ev, "identity", False)
    finally:
        ev.destroy()
        x.destroy()
        y.destroy()


class Serial:
    """Serial references on rank 0 (COMM_SELF), cached per case."""

    def __init__(self):
        self.problems = {}
        self.outputs = {}

    def problem(self, scene, shape, seed):
        key = (scene, shape, seed)
        if key not in self.problems:
            self.problems[key] = Problem.from_scene(scene, shape, seed=seed, comm=PETSc.COMM_SELF)
        return self.problems[key]

    def output(self, nets, dtype, scene, shape, seed, x_global):
        key = (dtype, scene, shape, seed)
        if key not in self.outputs:
            s = self.problem(scene, shape, seed)
            out, dec, _ = evaluate(nets[dtype], dtype, s, x_global)
            assert dec is None
            self.outputs[key] = out
        return self.outputs[key]

    def destroy(self):
        for p in self.problems.values():
            p.destroy()


def check_eval(nets, serial, scene, shape, seed, procs, dtypes):
    p = Problem.from_scene(scene, shape, seed=seed, comm=comm, proc_sizes=procs)
    lines = []
    try:
        x_global = field(shape, seed)
        dmda_procs = "x".join(str(len(r)) for r in p.da.getOwnershipRanges())
        if procs is not None:
            assert dmda_procs == "x".join(map(str, procs)), (dmda_procs, procs)
        for dtype in dtypes:
            out, dec, direct = evaluate(nets[dtype], dtype, p, x_global)
            if size == 1:   # the serial path: nothing to distribute
                assert dec is None
                active = 1
            else:
                ref_dec = Decomposition(shape, nets[dtype].multiple_for(shape), size, rank,
                                        ranges=p.da.getOwnershipRanges(),
                                        gather=_gather_rule(nets[dtype]))
                assert dec.procs == ref_dec.procs and dec.active_ranks == ref_dec.active_ranks
                active = mpi.allreduce(int(dec.active))
                assert active == dec.active_ranks, (active, dec.active_ranks)
            err = None
            if rank == 0:
                ref = serial.output(nets, dtype, scene, shape, seed, x_global)
                assert out.shape == ref.shape == (shape[2], shape[1], shape[0])
                assert np.isfinite(out).all(), "NaN left in the output"
                scale = np.abs(ref).max()
                assert scale > 0
                err = float(np.abs(out - ref).max() / scale)
            err = mpi.bcast(err, root=0)
            # direct: the DMDA split was aligned, no VecScatter
            lines.append(f"CASE {size} {'x'.join(map(str, shape))} {scene} {dmda_procs} {dtype} "
                         f"{err:.3e} {active}/{size} {'direct' if direct else 'scatter'}")
            assert err <= TOL[dtype], lines[-1]
    finally:
        p.destroy()
    return lines


def check_geometry(serial, scene, shape, seed):
    """geometry_from_operator on this decomposition (ghost exchange for the
    air cells) equals the serial derivation."""
    p = Problem.from_scene(scene, shape, seed=seed, comm=comm)
    try:
        flags, dirichlet = geometry_from_operator(p.da, p.A, p.local_flags.shape)
        nat = []
        for arr in (flags.astype(float), dirichlet):
            v = p.da.createGlobalVec()
            with v as va:
                va.reshape(p.local_flags.shape)[...] = arr
            nat.append(p.to_natural(v))
            v.destroy()
        if rank == 0:
            s = serial.problem(scene, shape, seed)
            sf, sd = geometry_from_operator(s.da, s.A, s.local_flags.shape)
            assert np.array_equal(nat[0], sf.astype(float)), \
                f"{int((nat[0] != sf).sum())} derived flags differ from the serial ones"
            np.testing.assert_allclose(nat[1], sd, atol=1e-14)
            assert (sf == 0).any()
    finally:
        p.destroy()
    return f"OK geometry {size} {'x'.join(map(str, shape))} {scene}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also 65x65x65 (liquid)")
    a = ap.parse_args()
    nets = {dt: load_model(None, dtype=dt)[0] for dt in ("float32", "float64")}
    grid = (33, 40, 29)
    small = (16, 14, 13)         # two levels only: the network's smallest depth
    cases = []
    for scene in ("liquid", "spheres"):
        cases.append((scene, grid, 4, None, ("float32", "float64")))
    cases.append(("liquid", grid, 4, (size, 1, 1), ("float32", "float64")))
    cases.append(("smoke", grid, 2, (1, 1, size), ("float32",)))
    cases.append(("liquid", small, 1, None, ("float32", "float64")))
    # a power-of-two grid: PETSc's own split is aligned for 2, 4, 8 ranks
    cases.append(("spheres", (32, 32, 32), 5, None, ("float32",)))
    if a.big:
        cases.append(("liquid", (65, 65, 65), 6, None, ("float32", "float64")))
    serial = Serial() if rank == 0 else None
    failures = []
    try:
        for scene, shape, seed, procs, dtypes in cases:
            ok, msg, lines = True, "", []
            try:
                lines = check_eval(nets, serial, scene, shape, seed, procs, dtypes)
            except Exception:
                ok, msg = False, traceback.format_exc()
            ok = mpi.allreduce(ok, op=__import__("mpi4py").MPI.LAND)
            if rank == 0:
                for l in lines:
                    print(l, flush=True)
            if not ok:
                failures.append(f"eval {scene} {shape} procs={procs}")
                if msg:
                    sys.stderr.write(f"[rank {rank}] {scene} {shape} {procs}:\n{msg}\n")
        for scene, shape in (("liquid", grid), ("spheres", small)):
            ok, msg = True, ""
            try:
                line = check_geometry(serial, scene, shape, 4)
            except Exception:
                ok, msg = False, traceback.format_exc()
            ok = mpi.allreduce(ok, op=__import__("mpi4py").MPI.LAND)
            if ok and rank == 0:
                print(line, flush=True)
            if not ok:
                failures.append(f"geometry {scene} {shape}")
                if msg:
                    sys.stderr.write(f"[rank {rank}] geometry {scene} {shape}:\n{msg}\n")
    finally:
        if serial is not None:
            serial.destroy()
    sys.stderr.flush()
    return finish(failures)


if __name__ == "__main__":
    sys.exit(main())
