"""Per-rank set-up (issue #18): each rank's block of a scene, generated from
the seed at its global coordinates, equals the whole-grid scene there; the
MPI checks (tests/mpi/check_local.py) compare the distributed labelling of
closed regions with scipy's serial one and the local-block APIs with the
whole-grid ones."""
from pathlib import Path

import numpy as np
import pytest

from deepcd_petsc.coefficients import family
from deepcd_petsc.errors import UserError
from deepcd_petsc.scenes import (SCENES, FAMILY_SCENES, finish_block, make_flags, padded,
                                 remove_isolated_fluid, scene_block, window_indices)
from helpers import run_mpi

SHAPE = (11, 9, 13)            # (nz, ny, nx)
# blocks ((xs, xe), (ys, ye), (zs, ze)): corners, edges, the interior, the whole grid
BOXES = [((0, 4), (0, 3), (0, 5)), ((9, 13), (6, 9), (7, 11)), ((4, 9), (3, 6), (5, 7)),
         ((0, 13), (0, 9), (0, 11)), ((12, 13), (0, 9), (3, 4))]
# 2D (nz = 1): rasterised per block too, not as a whole plane per rank
SHAPE2 = (1, 29, 23)
BOXES2 = [((0, 7), (0, 10), (0, 1)), ((15, 23), (20, 29), (0, 1)), ((6, 17), (9, 21), (0, 1)),
          ((0, 23), (0, 29), (0, 1)), ((22, 23), (3, 4), (0, 1))]
GRIDS = [(SHAPE, BOXES), (SHAPE2, BOXES2)]


def window(p, box):
    (xs, xe), (ys, ye), (zs, ze) = box
    return p[zs:ze + 2, ys:ye + 2, xs:xe + 2]


@pytest.mark.parametrize("scene", [s for s in SCENES if s != "file"])
@pytest.mark.parametrize("seed", [1, 5, 7])
@pytest.mark.parametrize("shape,boxes", GRIDS, ids=["3d", "2d"])
def test_scene_block_equals_whole_scene(scene, seed, shape, boxes):
    flags, faces = make_flags(scene, shape, seed)
    whole = padded(flags, faces)
    for box in boxes:
        block, f2 = scene_block(scene, shape, seed, box)
        assert f2 == faces
        assert np.array_equal(block, window(whole, box)), (scene, seed, box)


def test_scene_block_file_reads_its_window(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.choice(np.array([0, 1, 2], np.int8), size=SHAPE, p=[0.6, 0.3, 0.1])
    path = tmp_path / "f.npy"
    np.save(path, arr)
    flags, _ = make_flags("file", SHAPE, flags_file=str(path), open_faces={"x-", "z+"})
    whole = padded(flags, {"x-", "z+"})
    for box in BOXES:
        block, _ = scene_block("file", SHAPE, 0, box, str(path), {"x-", "z+"})
        assert np.array_equal(block, window(whole, box))
    # a bad value is reported with its global position, by the rank that reads it
    arr[10, 8, 12] = 5
    np.save(path, arr)
    with pytest.raises(UserError, match=r"value 5 at \(k, j, i\) = \(10, 8, 12\)"):
        scene_block("file", SHAPE, 0, BOXES[1], str(path), set())
    scene_block("file", SHAPE, 0, BOXES[0], str(path), set())   # not in that block


@pytest.mark.parametrize("name", FAMILY_SCENES)
@pytest.mark.parametrize("shape,boxes", GRIDS, ids=["3d", "2d"])
def test_family_block_equals_whole_family(name, shape, boxes):
    flags, faces, coef = family(name, shape, 4)
    per = coef.periodic
    flags = remove_isolated_fluid(flags, faces, per)
    whole = padded(flags, faces, per)
    trans = coef.face_transmissibilities(whole)
    for box in boxes:
        win = window_indices(shape, box, 2, per)
        axes = [w[0] for w in win]
        # perm: a block's own maximum is not the grid's: give the grid's
        raw, _, c = family(name, shape, 4, axes=axes,
                           allmax=(lambda v: _unnormalised_max(shape)) if name == "perm" else float)
        pf = finish_block(raw, [w[1] for w in win], faces, per)
        assert np.array_equal(pf, window(whole, box)), (name, box)
        c.k = c.k[1:-1, 1:-1, 1:-1]
        t = c.block_transmissibilities(pf, [a[1:-1] for a in axes])
        (xs, xe), (ys, ye), (zs, ze) = box
        assert np.array_equal(t, trans[:, zs:ze, ys:ye, xs:xe]), (name, box)


def _unnormalised_max(shape):
    """perm's field maximum over the whole grid before normalising."""
    from deepcd_petsc.coefficients import _smooth_field
    m = []
    _smooth_field(shape, np.random.default_rng([4, 4242]), allmax=lambda v: m.append(v) or v)
    return m[0]


SCRIPT = Path(__file__).resolve().parent / "mpi" / "check_local.py"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [3, 8])
def test_distributed_labels_and_local_apis(n):
    r = run_mpi(n, [SCRIPT], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK {n}" in r.stdout.splitlines()


@pytest.mark.parametrize("shape", [(1, 10 ** 6, 10 ** 6), (10 ** 4,) * 3], ids=["2d", "3d"])
def test_blocks_of_a_huge_grid_cost_only_the_block(shape):
    """A rank's block of a 10¹² cell grid: no whole-grid array anywhere
    (a whole plane or volume would need a terabyte)."""
    box = ((499_990, 499_996), (10, 17), (0, 1)) if shape[0] == 1 else \
        ((4000, 4005), (9000, 9004), (17, 20))
    for scene in (s for s in SCENES if s != "file"):
        block, _ = scene_block(scene, shape, 3, box)
        assert block.shape == tuple(hi - lo + 2 for lo, hi in box[::-1])
    for name in (f for f in FAMILY_SCENES if f != "stretch"):   # 1.08^(10⁴ layers) overflows
        win = window_indices(shape, box, 2, (False,) * 3)
        raw, _, c = family(name, shape, 3, axes=[w[0] for w in win])
        assert raw.shape == c.k.shape == tuple(len(w[0]) for w in win)
