"""Cell flags of pressure-Poisson scenes.

A scene is an int8 array of shape (nz, ny, nx) (x fastest, PETSc's natural
ordering) with FLUID = 0, SOLID = 1, AIR = 2, plus the set of domain faces
that are open (Dirichlet p = 0 beyond them). z points up: "top" is z+.
Every scene is a pure function of (shape, seed), so all ranks build the same
geometry without communication. Each generator also evaluates only the cells
at given global indices (`axes`): a rank rasterises its own block plus the
halo it needs (scene_block), never the whole grid, and gets the very values
the whole-grid scene has there. A 2D scene has nz = 1 and y points up:
its top is y+, its obstacles are discs (_scene2d).
"""
import numpy as np

from .errors import UserError

FLUID, SOLID, AIR = 0, 1, 2
FACES = ("x-", "x+", "y-", "y+", "z-", "z+")
SCENES = ("box", "smoke", "spheres", "liquid", "file")
# operator families (coefficients.py): scenes with coefficients, not flags only
FAMILY_SCENES = ("density", "perm", "aniso", "stretch", "periodic")


def _axes(shape_zyx, axes=None):
    """Global cell indices (z, y, x) to evaluate a scene at: all by default."""
    if axes is None:
        return tuple(np.arange(n) for n in shape_zyx)
    return tuple(np.asarray(a, dtype=np.int64) for a in axes)


def _centres(shape_zyx, axes=None):
    return tuple((a + 0.5) / n for a, n in zip(_axes(shape_zyx, axes), shape_zyx))


def _add_sphere(flags, centre, radius, axes=None, shape=None):
    """Mark a solid sphere (in unit-cube coordinates) touching only its
    bounding box, so cost scales with the sphere, not the grid. `axes`:
    the global indices flags' cells stand for (of a grid `shape`)."""
    shape = flags.shape if shape is None else shape
    axes = _axes(shape, axes)
    pos, coords = [], []
    for c, n, a in zip(centre, shape, axes):
        lo = max(int(np.floor((c - radius) * n)), 0)
        hi = min(int(np.ceil((c + radius) * n)) + 1, n)
        p = np.nonzero((a >= lo) & (a < hi))[0]
        if p.size == 0:
            return
        pos.append(p)
        coords.append((a[p] + 0.5) / n - c)
    dz, dy, dx = np.meshgrid(*coords, indexing="ij", sparse=True)
    inside = dz ** 2 + dy ** 2 + dx ** 2 <= radius ** 2
    ix = np.ix_(*pos)
    sub = flags[ix]
    sub[inside & (sub == FLUID)] = SOLID
    flags[ix] = sub


def _random_spheres(flags, rng, count, rmin, rmax, zmax=1.0, axes=None, shape=None):
    for _ in range(count):
        r = rng.uniform(rmin, rmax)
        c = (rng.uniform(0.15, zmax - 0.1), rng.uniform(0.15, 0.85),
             rng.uniform(0.15, 0.85))
        _add_sphere(flags, c, r, axes, shape)


def _empty(shape, axes):
    return np.zeros(tuple(len(a) for a in _axes(shape, axes)), np.int8)


def _scene2d(name, shape, seed, axes=None):
    """The 2D version of a scene on (1, ny, nx): the same construction in
    the (y, x) plane with y up (discs, rectangles, a wavy level in y), at
    the cells of `axes` as the 3D generators (every z index is 0)."""
    rng = np.random.default_rng(seed)
    flags = _empty(shape, axes)
    _, ny, nx = shape
    _, gy, gx = _axes(shape, axes)
    if name == "smoke":
        for _ in range(rng.integers(1, 4)):
            lo = rng.uniform(0.1, 0.6, 2)
            ext = rng.uniform(0.1, 0.3, 2)
            sl = [(int(a * n), max(int((a + e) * n), int(a * n) + 1)) for a, e, n in zip(lo, ext, (ny, nx))]
            (y0, y1), (x0, x1) = sl
            flags[:, ((gy >= y0) & (gy < y1))[:, None] & ((gx >= x0) & (gx < x1))[None, :]] = SOLID
    elif name == "spheres":
        for _ in range(rng.integers(4, 11)):
            r = rng.uniform(0.06, 0.16)
            _add_sphere(flags, (0.5, rng.uniform(0.15, 0.9), rng.uniform(0.15, 0.85)), r, axes, shape)
    elif name == "liquid":
        _, y, x = _centres(shape, axes)
        level = rng.uniform(0.45, 0.7)
        amp, kx, ph = rng.uniform(0.02, 0.08), rng.integers(1, 4), rng.uniform(0, 2 * np.pi)
        surface = level + amp * np.sin(2 * np.pi * kx * x + ph)
        flags[:, y[:, None] > surface[None, :]] = AIR
        for _ in range(rng.integers(2, 7)):
            r = rng.uniform(0.05, 0.13)
            _add_sphere(flags, (0.5, rng.uniform(0.15, level - 0.1), rng.uniform(0.15, 0.85)), r, axes, shape)
    return flags, ({"y+"} if name != "box" else set())


def box(shape, seed, axes=None):
    """Closed box full of fluid: singular, constant null space."""
    return _empty(shape, axes), set()


def smoke(shape, seed, axes=None):
    """Smoke in a box with an open top and a few solid blocks."""
    rng = np.random.default_rng(seed)
    flags = _empty(shape, axes)
    nz, ny, nx = shape
    for _ in range(rng.integers(1, 4)):
        lo = rng.uniform(0.1, 0.6, 3)
        ext = rng.uniform(0.1, 0.3, 3)
        sl = tuple(slice(int(a * n), max(int((a + e) * n), int(a * n) + 1))
                   for a, e, n in zip(lo, ext, (nz, ny, nx)))
        flags[np.ix_(*((g >= s.start) & (g < s.stop) for g, s in zip(_axes(shape, axes), sl)))] = SOLID
    return flags, {"z+"}


def spheres(shape, seed, axes=None):
    """Random solid spheres in a box with an open top."""
    rng = np.random.default_rng(seed)
    flags = _empty(shape, axes)
    _random_spheres(flags, rng, rng.integers(4, 11), 0.06, 0.16, axes=axes, shape=shape)
    return flags, {"z+"}


def liquid(shape, seed, axes=None):
    """Liquid pool with a wavy free surface (air above), obstacles inside."""
    rng = np.random.default_rng(seed)
    flags = _empty(shape, axes)
    z, y, x = _centres(shape, axes)
    level = rng.uniform(0.45, 0.7)
    amp, kx, ky, ph = rng.uniform(0.02, 0.08), *rng.integers(1, 4, 2), \
        rng.uniform(0, 2 * np.pi)
    surface = level + amp * np.sin(2 * np.pi * (kx * x[None, :] + ky * y[:, None]) + ph)
    flags[z[:, None, None] > surface[None, :, :]] = AIR
    _random_spheres(flags, rng, rng.integers(2, 7), 0.05, 0.13, zmax=level, axes=axes, shape=shape)
    return flags, {"z+"}


GENERATORS = {"box": box, "smoke": smoke, "spheres": spheres, "liquid": liquid}


def load_npy(path, what):
    """A user's .npy array, memory-mapped (each rank reads only its block);
    never unpickles objects."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{what} {path!r} is not a readable .npy array ({e})") from None


def load_flags(path, shape, axes=None):
    """Flags from a user's .npy: integer array (nz, ny, nx), values 0/1/2.
    `axes`: read (and check) only the cells at those global indices (z, y,
    x), from the memory map: a rank's block, never the whole file."""
    arr = load_npy(path, "flag file")
    if arr.ndim == 2:
        arr = arr[None]       # (ny, nx): a 2D grid
    if arr.ndim != 3:
        raise UserError(f"flag file {path!r} has {arr.ndim} dimensions; expected a 3D array of shape (nz, ny, nx)")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise UserError(f"flag file {path!r} has dtype {arr.dtype}; expected an integer array (0 fluid, 1 solid, 2 air)")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        nz, ny, nx = arr.shape
        raise UserError(f"flag file {path!r} has shape {tuple(arr.shape)} (nz, ny, nx) = grid {nx},{ny},{nz}, "
                        f"but the grid asked for is {shape[2]},{shape[1]},{shape[0]}")
    axes = _axes(arr.shape, axes)
    arr = np.asarray(arr[np.ix_(*axes)])
    bad = (arr < 0) | (arr > 2)
    if bad.any():
        idx = [int(a[i]) for a, i in zip(axes, np.argwhere(bad)[0])]
        raise UserError(f"flag file {path!r} holds value {int(arr[tuple(np.argwhere(bad)[0])])} at (k, j, i) = {tuple(idx)}; "
                        "allowed values are 0 fluid, 1 solid, 2 air")
    return arr.astype(np.int8)


def parse_faces(text):
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return set()
    faces = {f.strip() for f in text.replace("top", "z+").split(",") if f.strip()}
    bad = faces - set(FACES)
    if bad:
        raise UserError(f"unknown face(s) {sorted(bad)} in --open; use a comma list of {', '.join(FACES)} (or 'top', 'none')")
    return faces


def make_flags(scene, shape, seed=0, flags_file=None, open_faces=None):
    """(flags, open_faces) for a scene; `shape` is (nz, ny, nx)."""
    if scene not in SCENES:
        raise UserError(f"unknown scene {scene!r}; choose one of {', '.join(SCENES + FAMILY_SCENES)}")
    if scene == "file" or flags_file is not None:
        if flags_file is None:
            raise UserError("scene 'file' needs --flags FILE.npy")
        flags, faces = load_flags(flags_file, shape), set()
    elif shape[0] == 1:
        flags, faces = _scene2d(scene, tuple(shape), seed)
    else:
        flags, faces = GENERATORS[scene](tuple(shape), seed)
    if open_faces is not None:
        faces = set(open_faces)
    flags = remove_isolated_fluid(flags, faces)
    if not (flags == FLUID).any():
        raise UserError("the domain has no fluid cell: nothing to solve")
    return flags, faces


def padded(flags, open_faces, periodic=(False, False, False)):
    """Flags with one layer of ghost cells: AIR beyond open faces, SOLID
    beyond walls, the opposite side's cells on `periodic` (z, y, x) axes."""
    p = np.pad(flags, 1, constant_values=SOLID)
    for axis in range(3):
        if periodic[axis]:
            p = np.moveaxis(p, axis, 0)
            p[0], p[-1] = p[-2].copy(), p[1].copy()
            p = np.moveaxis(p, 0, axis)
    for face in open_faces:
        axis = {"x": 2, "y": 1, "z": 0}[face[0]]
        idx = [slice(None)] * 3
        idx[axis] = -1 if face[1] == "+" else 0
        p[tuple(idx)] = AIR
    return p


def remove_isolated_fluid(flags, open_faces, periodic=(False, False, False)):
    """Fluid cells walled in on all six sides have an all-zero matrix row
    (a one-cell null space that breaks Jacobi/ICC); they carry no flow, so
    make them solid. `periodic` (z, y, x): neighbours wrap on those axes."""
    isolated = _isolated(padded(flags, open_faces, periodic))
    if isolated.any():
        flags = flags.copy()
        flags[isolated] = SOLID
    return flags


def _isolated(p):
    """Fluid cells of p's interior with no non-solid face neighbour in p."""
    fluid = p[1:-1, 1:-1, 1:-1] == FLUID
    o = p != SOLID
    open_nb = (o[:-2, 1:-1, 1:-1] | o[2:, 1:-1, 1:-1] | o[1:-1, :-2, 1:-1]
               | o[1:-1, 2:, 1:-1] | o[1:-1, 1:-1, :-2] | o[1:-1, 1:-1, 2:])
    return fluid & ~open_nb


# -- one rank's block -----------------------------------------------------------
def window_indices(shape, box, halo, periodic=(False, False, False)):
    """Per axis (z, y, x): (global indices, side) of the cells of a block
    `box` ((xs, xe), (ys, ye), (zs, ze)) widened by `halo` layers. Indices
    wrap on periodic axes and are clipped elsewhere (the coefficients' edge
    padding); side is −1/+1 for cells beyond the grid's low/high edge before
    wrapping, 0 inside."""
    out = []
    for (lo, hi), n, per in zip(box[::-1], shape, periodic):
        raw = np.arange(lo - halo, hi + halo)
        side = (raw >= n).astype(np.int8) - (raw < 0)
        out.append((raw % n if per else np.clip(raw, 0, n - 1), side))
    return out


def ghost_cells(flags, sides, open_faces, periodic=(False, False, False)):
    """Set the cells of a window beyond the grid as `padded` does: SOLID
    beyond walls, AIR beyond open faces; periodic axes keep their wrapped
    values. In place; returns flags."""
    for axis, side in enumerate(sides):
        if not periodic[axis]:
            idx = [slice(None)] * 3
            idx[axis] = side != 0
            flags[tuple(idx)] = SOLID
    for face in open_faces:
        axis = {"x": 2, "y": 1, "z": 0}[face[0]]
        idx = [slice(None)] * 3
        idx[axis] = sides[axis] == (1 if face[1] == "+" else -1)
        flags[tuple(idx)] = AIR
    return flags


def finish_block(raw, sides, open_faces, periodic=(False, False, False)):
    """A scene's raw values on a window of halo h + 1 → the block's flags
    with h ghost layers, equal to padded(remove_isolated_fluid(whole
    scene)) there: the extra layer is what deciding isolation in the
    ghost layer needs."""
    p = ghost_cells(np.array(raw, dtype=np.int8), sides, open_faces, periodic)
    inner = p[1:-1, 1:-1, 1:-1]
    inner[_isolated(p)] = SOLID
    return inner


def scene_block(scene, shape, seed, box, flags_file=None, open_faces=None, halo=1):
    """(flags, open faces) of one rank's block of make_flags' scene, with
    `halo` ghost layers as `padded` adds them: rasterised from the seed at
    the block's global coordinates (a flag file: read from its memory
    map), never as a whole-grid array. The caller checks for fluid on all
    ranks (make_flags' "no fluid" error is global)."""
    if scene not in SCENES:
        raise UserError(f"unknown scene {scene!r}; choose one of {', '.join(SCENES + FAMILY_SCENES)}")
    win = window_indices(shape, box, halo + 1)
    axes = [w[0] for w in win]
    if scene == "file" or flags_file is not None:
        if flags_file is None:
            raise UserError("scene 'file' needs --flags FILE.npy")
        raw, faces = load_flags(flags_file, shape, axes), set()
    elif shape[0] == 1:
        raw, faces = _scene2d(scene, tuple(shape), seed, axes)
    else:
        raw, faces = GENERATORS[scene](tuple(shape), seed, axes=axes)
    if open_faces is not None:
        faces = set(open_faces)
    return finish_block(raw, [w[1] for w in win], faces), faces
