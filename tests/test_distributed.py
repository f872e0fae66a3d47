"""Distributed DCDM: the aligned block decomposition (unit tests), the
distributed network evaluation against the serial one under mpiexec
(tests/mpi/check_distributed.py), iteration counts independent of the rank
count, and a rank without fluid (tests/mpi/check_ksp.py solid)."""
import itertools
import json
import re

import numpy as np
import pytest

from helpers import REPO, run_cli, run_cli_mpi, run_mpi, run_python

from deepcd_petsc.halo import Decomposition

CHECK_DISTRIBUTED = REPO / "tests" / "mpi" / "check_distributed.py"
CHECK_KSP = REPO / "tests" / "mpi" / "check_ksp.py"
TOL = {"float32": 1e-5, "float64": 1e-12}


# ------------------------------------------------------------------ Decomposition
def best_count(units, size):
    """Most ranks a Px×Py×Pz grid of blocks (P_d <= units_d) can use."""
    return max(px * py * pz for px, py, pz in itertools.product(*(range(1, u + 1) for u in units))
               if px * py * pz <= size)


DECOMPOSITIONS = [((33, 40, 29), 16, p) for p in range(1, 10)] + [
    ((65, 65, 65), 16, 8), ((65, 65, 65), 16, 5), ((16, 16, 16), 16, 3), ((16, 14, 13), 16, 8),
    ((64, 64, 64), 16, 7), ((100, 20, 36), 8, 5), ((12, 12, 12), 4, 6), ((32, 8, 8), 16, 2),
    ((17, 5, 40), 4, 11), ((24, 24, 24), 16, 4),
]


@pytest.mark.parametrize("shape,multiple,size", DECOMPOSITIONS)
def test_decomposition(shape, multiple, size):
    decs = [Decomposition(shape, multiple, size, r) for r in range(size)]
    d0 = decs[0]
    units = [-(-s // multiple) for s in shape]
    padded = tuple(u * multiple for u in units)
    assert d0.padded == padded
    assert all(d.procs == d0.procs and d.active_ranks == d0.active_ranks for d in decs)
    px, py, pz = d0.procs
    assert d0.active_ranks == px * py * pz <= size
    assert all(p <= u for p, u in zip(d0.procs, units))
    assert d0.active_ranks == best_count(units, size)   # as many ranks as fit
    cover = np.zeros(units[::-1], int)                   # (z, y, x) in units
    for r, d in enumerate(decs):
        assert d.active == (r < d0.active_ranks)
        if not d.active:
            assert all(lo == hi for lo, hi in d.block)
            assert all(lo == hi for lo, hi in d.real_block)
            continue
        for axis, ((lo, hi), (rlo, rhi), n) in enumerate(zip(d.block, d.real_block, shape)):
            assert lo % multiple == 0 and hi % multiple == 0, (r, d.block)
            assert 0 <= lo < hi <= padded[axis]
            assert (rlo, rhi) == (lo, min(hi, n)) if lo < n else rlo == rhi
            # neighbours: the block that continues this one along the axis
            for step in (-1, 1):
                nb = d.neighbour(axis, step)
                edge = lo == 0 if step == -1 else hi == padded[axis]
                assert (nb is None) == edge, (r, axis, step, nb)
                if nb is not None:
                    e = decs[nb]
                    assert e.active
                    assert (e.block[axis][1] == lo) if step == -1 else (e.block[axis][0] == hi)
                    assert all(e.block[o] == d.block[o] for o in range(3) if o != axis)
        (x0, x1), (y0, y1), (z0, z1) = (tuple(v // multiple for v in b) for b in d.block)
        cover[z0:z1, y0:y1, x0:x1] += 1
    assert (cover == 1).all(), "blocks must cover the padded grid exactly once"
    # near-equal split: block extents along an axis differ by at most one unit
    for axis in range(3):
        ext = {(d.block[axis][1] - d.block[axis][0]) // multiple for d in decs if d.active}
        assert max(ext) - min(ext) <= 1, (axis, ext)


def test_decomposition_inactive_ranks():
    d = [Decomposition((16, 16, 16), 16, 3, r) for r in range(3)]
    assert d[0].active_ranks == 1 and d[0].procs == (1, 1, 1)
    assert [x.active for x in d] == [True, False, False]
    assert d[0].block == ((0, 16),) * 3
    # 7 ranks on 4x4x4 units: 7 is prime and > 4, so 6 work and 1 idles
    d = Decomposition((64, 64, 64), 16, 7, 6)
    assert d.active_ranks == 6 and not d.active


def test_decomposition_takes_an_aligned_application_split():
    """PETSc's split used as it is when every inner boundary is a multiple
    of the alignment (the last block reaches to the padded size); else the
    own near-equal split."""
    ranges = ([32, 32], [64], [16, 16, 17])          # x, y, z cells per process
    d = [Decomposition((64, 64, 49), 16, 6, r, ranges=ranges) for r in range(6)]
    assert d[0].procs == (2, 1, 3) and all(x.active for x in d)
    assert d[0].padded == (64, 64, 64)
    assert d[0].block == ((0, 32), (0, 64), (0, 16))
    assert d[5].block == ((32, 64), (0, 64), (32, 64)) and d[5].real_block[2] == (32, 49)
    own = Decomposition((64, 64, 49), 16, 6, 0, ranges=([30, 34], [64], [16, 16, 17]))
    assert own.procs != (2, 1, 3) or list(own.starts[0]) != [0, 30, 64]
    assert all(v % 16 == 0 for axis in own.starts for v in axis)
    wrong_count = Decomposition((64, 64, 64), 16, 4, 0, ranges=([32, 32], [64], [64]))
    assert wrong_count.active_ranks == 4     # 2 blocks for 4 ranks: not used


# ------------------------------------------------------------------ evaluation exactness
CASE = re.compile(r"^CASE (\d+) (\S+) (\S+) (\S+) (float32|float64) (\S+) (\d+)/(\d+) "
                  r"(direct|scatter)$")


def check_exactness(r, size, big):
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert f"OK {size}" in lines, r.stdout + r.stderr
    cases = [m for m in map(CASE.match, lines) if m]
    assert len(cases) == (12 if big else 10), r.stdout
    for m in cases:
        assert int(m.group(1)) == size and int(m.group(8)) == size
        assert float(m.group(6)) <= TOL[m.group(5)], m.group(0)
    procs = {m.group(4) for m in cases if m.group(2) == "33x40x29"}
    if size > 1:
        assert f"{size}x1x1" in procs and f"1x1x{size}" in procs, procs
        # the network's alignment follows the grid (2 levels at 16x14x13):
        # even the small grid gives every rank a block
        small = [m for m in cases if m.group(2) == "16x14x13"]
        assert small and all(int(m.group(7)) == size for m in small), r.stdout
    if size in (2, 4, 8):
        # PETSc's split of 32³ is aligned: the evaluator skips the VecScatter
        pow2 = [m for m in cases if m.group(2) == "32x32x32"]
        assert pow2 and all(m.group(9) == "direct" for m in pow2), r.stdout
    if size > 1:
        # 33x40x29 split 1x1xP/Px1x1 by PETSc is never aligned: the scatter path
        assert any(m.group(9) == "scatter" for m in cases), r.stdout
    if big:
        assert sum(m.group(2) == "65x65x65" for m in cases) == 2
    assert sum(l.startswith("OK geometry") for l in lines) == 2, r.stdout
    return cases


@pytest.mark.mpi
@pytest.mark.parametrize("size", [2, 3, 4, 6, 8])
def test_distributed_evaluation_equals_serial(size):
    big = size in (2, 8)
    r = run_mpi(size, [CHECK_DISTRIBUTED] + (["--big"] if big else []))
    check_exactness(r, size, big)


def test_evaluation_one_process_big():
    """The same script on one process (no mpiexec): the serial path on
    COMM_WORLD against COMM_SELF, including 65^3."""
    check_exactness(run_python([CHECK_DISTRIBUTED, "--big"]), 1, True)


# ------------------------------------------------------------------ DCDM under mpiexec
def solve_json(size, extra):
    args = ["solve", "--scene", "spheres", "--n", "24", "--seed", "0",
            "-ksp_type", "python", "-ksp_python_type", "deepcd_petsc.DCDM",
            "-ksp_rtol", "1e-6", *extra, "--json"]
    r = run_cli(args) if size == 1 else run_cli_mpi(size, args)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads([l for l in r.stdout.splitlines() if l.strip()][-1])
    assert res["ranks"] == size
    assert res["reason"] == "CONVERGED_RTOL" and res["true_residual"] <= 1e-6, res
    return res["iterations"]


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_iterations_independent_of_ranks(dtype):
    its = {p: solve_json(p, ["-ksp_dcdm_dtype", dtype]) for p in (1, 2, 4)}
    assert all(abs(its[p] - its[1]) <= 1 for p in its), f"{dtype}: iterations by rank count {its}"


@pytest.mark.mpi
def test_rank_without_fluid():
    r = run_mpi(2, [CHECK_KSP, "solid"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(l.startswith("OK solid ranks=2 ") for l in r.stdout.splitlines()), r.stdout + r.stderr


def test_level_padding_pads_the_gathered_level_not_the_grid():
    """With a gathered level the grid is padded only to that level's
    divisors and the level itself to the factors below it; without one,
    the grid to all of them (the 120³ corner rank held 48³ cells, not 40³)."""
    from deepcd_petsc.halo import level_padding
    from deepcd_petsc.mgnet import gather_level
    full = [(2, 2, 2)] * 4                                  # 5 levels: multiple 16
    assert level_padding((120,) * 3, full, gather_level) == (2, (120,) * 3, (32,) * 3)
    assert level_padding((120,) * 3, full) == (None, (128,) * 3, None)
    # (z, y, x) = (29, 40, 33), 3 levels: level 1 (18·20·17 cells) is gathered
    assert level_padding((29, 40, 33), full[:2], gather_level) == (1, (30, 40, 34), (16, 20, 18))
    # semi-coarsened: z halves once more below the gathered level
    plan = [(2, 2, 2), (2, 1, 1), (2, 1, 1)]
    assert level_padding((90, 20, 20), plan, gather_level) == (1, (90, 20, 20), (48, 10, 10))
    d = Decomposition((120, 120, 120), 16, 27, 26, ranges=([40] * 3,) * 3, gather=gather_level)
    assert d.padded == (120,) * 3 and d.block == ((80, 120),) * 3 and d.gathered_shape == (32,) * 3
