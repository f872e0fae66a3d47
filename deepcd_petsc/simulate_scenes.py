"""Scenes of `deepcd simulate`: initial state, sources and forces, the moving
obstacle and the cell flags of each step. Every random choice is drawn from
the seed alone and evaluated at global positions, so each rank computes the
same scene for its block without communication (and 1 or N ranks agree)."""
import numpy as np

from .scenes import AIR, FLUID, SOLID, remove_isolated_fluid

SIM_SCENES = ("smoke", "liquid")


def sphere_cells(n, dx, centre, radius):
    """Global (nz, ny, nx) mask of the cells whose centre lies in the sphere
    (physical coordinates), computed on its bounding box only."""
    mask = np.zeros(n, bool)
    sl, axes = [], []
    for c, m in zip(centre, n):
        lo = max(int(np.floor((c - radius) / dx)), 0)
        hi = min(int(np.ceil((c + radius) / dx)) + 1, m)
        sl.append(slice(lo, max(hi, lo)))
        axes.append((np.arange(lo, max(hi, lo)) + 0.5) * dx - c)
    dz, dy, dx_ = np.meshgrid(*axes, indexing="ij", sparse=True)
    mask[tuple(sl)] = dz ** 2 + dy ** 2 + dx_ ** 2 <= radius ** 2
    return mask


class Scene:
    """Common parts: the obstacle on a circular path in a horizontal plane."""
    open_faces = {"z+"}
    liquid = False
    path = dict(height=0.5, radius=0.2, size=0.12, period=2.0)

    def __init__(self, grid, seed):
        self.grid = grid
        self.seed = seed
        self.rng = np.random.default_rng([seed, 15])
        self.phase = self.rng.uniform(0, 2 * np.pi)
        self.extent = np.array(grid.n) * grid.dx        # (z, y, x) physical size

    def obstacle(self, t, moving=True):
        """(centre, velocity) of the sphere at time t, (z, y, x)."""
        p = self.path
        w = 2 * np.pi / p["period"]
        a = w * t + self.phase
        L = self.extent
        centre = np.array([p["height"] * L[0], L[1] * (0.5 + p["radius"] * np.sin(a)),
                           L[2] * (0.5 + p["radius"] * np.cos(a))])
        vel = np.array([0.0, L[1] * p["radius"] * w * np.cos(a), -L[2] * p["radius"] * w * np.sin(a)])
        return centre, (vel if moving else 0 * vel)

    def solid(self, centre):
        return sphere_cells(self.grid.n, self.grid.dx, centre, self.path["size"] * self.extent.max())

    def cell_centres(self):
        g = self.grid
        return [g.coords(g.cbox, b, 0.5) for b in range(3)]


class Smoke(Scene):
    """Hot smoke rising from a source on the floor, open top, a sphere
    circling through the plume. q is the smoke density."""
    buoyancy = 2.0          # upward acceleration per unit density
    inflow = 1.0            # speed of the source's jet
    source = dict(centre=(0.1, 0.5, 0.5), radius=0.08)

    def initial(self):
        g = self.grid
        return np.zeros(g.fshape()), np.zeros(g.cshape())

    def _in_source(self, box, offsets):
        g = self.grid
        L = self.extent
        c, r = self.source["centre"], self.source["radius"] * L.max()
        d2 = 0.0
        for b in range(3):
            d2 = d2 + (g.coords(box, b, offsets[b]) - c[b] * L[b]) ** 2
        return d2 <= r ** 2

    def forces(self, U, q, dt, step):
        """Source: density 1 and an upward jet (speed varied by a seeded
        wobble); buoyancy on the z faces from the mean density beside them."""
        g = self.grid
        q[self._in_source(g.cbox, (0.5, 0.5, 0.5))] = 1.0
        wob = np.random.default_rng([self.seed, 15, step]).uniform(0.8, 1.2)
        jet = self._in_source(g.fbox, (0.0, 0.5, 0.5))
        Gq = g.Q.exchange(q)
        lo = g.shifted(Gq, g.Q.origin, g.fbox, (-1, 0, 0))
        hi = g.shifted(Gq, g.Q.origin, g.fbox, (0, 0, 0))
        U[..., 0] += dt * self.buoyancy * 0.5 * (lo + hi)
        U[..., 0][jet] = self.inflow * wob
        return U, q

    def flags(self, q, solid):
        flags = np.where(solid, SOLID, FLUID).astype(np.int8)
        return remove_isolated_fluid(flags, self.open_faces), None

    def image(self, q, flags):
        """Side view: maximum of the density along y, (nz, nx)."""
        return q.max(axis=1), (flags == SOLID).any(axis=1)


class Liquid(Scene):
    """A drop falling into a pool, a sphere circling through the pool. q is
    a level set (negative in the liquid), advected, not redistanced."""
    gravity = 9.81
    depth = 0.3
    path = dict(height=0.2, radius=0.25, size=0.1, period=2.0)
    liquid = True

    def initial(self):
        g = self.grid
        L = self.extent
        z, y, x = self.cell_centres()
        c = np.array([0.68, 0.5 + self.rng.uniform(-0.1, 0.1), 0.5 + self.rng.uniform(-0.1, 0.1)]) * L
        r = 0.14 * L.max()
        drop = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - r
        return np.zeros(g.fshape()), np.broadcast_to(np.minimum(z - self.depth * L[0], drop),
                                                     g.cshape()).copy()

    def forces(self, U, q, dt, step):
        U[..., 0] -= dt * self.gravity
        return U, q

    def flags(self, q, solid):
        """Fluid where the level set is negative; a liquid cell with no liquid
        face neighbour (a droplet) is air for the pressure: p = 0 there, it
        flies freely (its rows would have no coupling at all)."""
        g = self.grid
        liquid = g.gather(q < 0, np.bool_) & ~solid
        flags = np.where(solid, SOLID, np.where(liquid, FLUID, AIR)).astype(np.int8)
        flags = remove_isolated_fluid(flags, self.open_faces)
        p = np.pad(flags == FLUID, 1)
        nb = (p[:-2, 1:-1, 1:-1] | p[2:, 1:-1, 1:-1] | p[1:-1, :-2, 1:-1]
              | p[1:-1, 2:, 1:-1] | p[1:-1, 1:-1, :-2] | p[1:-1, 1:-1, 2:])
        flags[(flags == FLUID) & ~nb] = AIR
        return flags, liquid

    def image(self, q, flags):
        """Side view: fraction of liquid along y, (nz, nx)."""
        return (q < 0).mean(axis=1), (flags == SOLID).any(axis=1)


SCENE_CLASSES = {"smoke": Smoke, "liquid": Liquid}
