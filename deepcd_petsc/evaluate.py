"""Model evaluation without PETSc: the DCDM iteration, CG and CG+Jacobi in
torch float64 on the matrix-free operator (CPU or GPU). The PETSc KSP in
ksp.py is the production solver; this is the yardstick for training."""
import time

import torch

from .model import dirichlet_fraction
from .operator import operator_of
from .problem import closed_regions, divergence_rhs
from .scenes import FLUID, padded


# Directions DCDM A-orthogonalises against, as in the paper (README,
# "Choosing m": more costs time and memory and saves little with the
# V-cycle network).
DEFAULT_NORTHO = 2


class TorchSystem:
    """A scene's A (matrix-free), b and null space as float64 torch tensors."""

    def __init__(self, scene, shape_xyz, seed, device="cpu"):
        from .coefficients import scene_operator
        nx, ny, nz = shape_xyz
        flags, faces, st = scene_operator(scene, (nz, ny, nx), seed)
        self.flags, self.faces, self.shape, self.stencil = flags, faces, shape_xyz, st
        self.op = operator_of(flags, faces, st, torch.float64, device)
        labels, closed = closed_regions(flags, faces)
        self.null = []
        for lab in closed:
            z = torch.as_tensor(labels == lab, dtype=torch.float64, device=device)
            self.null.append(z / z.norm())
        box = ((0, nx), (0, ny), (0, nz))
        b = divergence_rhs(padded(flags, faces, st.periodic if st is not None else (False,) * 3),
                           box, shape_xyz, seed)
        b[flags != FLUID] = 0.0
        self.b = self.project(torch.as_tensor(b, device=device))

    def project(self, v):
        for z in self.null:
            v = v - (z * v).sum() * z
        return v


def dcdm(system, net, geo, rtol=1e-6, maxit=500, northo=DEFAULT_NORTHO, dtype=torch.float32):
    """DCDM (Kaneda et al.): d = f(r/‖r‖), A-orthogonalised against the last
    `northo` directions; returns (iterations, residual history)."""
    A, b = system.op, system.b
    x = torch.zeros_like(b)
    r = b.clone()
    bn = b.norm().item()
    hist = [1.0]
    dirs = []
    it = 0
    with torch.inference_mode():
        while hist[-1] > rtol and it < maxit:
            rn = r.norm()
            d = net((r / rn).to(dtype)[None, None], geo)[0, 0].to(torch.float64)
            d = system.project(d)
            Ad = A(d)
            for p, Ap, pAp in dirs:
                c = (Ad * p).sum() / pAp
                d = d - c * p
                Ad = Ad - c * Ap
            dAd = (d * Ad).sum()
            if not torch.isfinite(dAd) or dAd <= 0:
                break
            alpha = (d * r).sum() / dAd
            x += alpha * d
            r -= alpha * Ad
            dirs = (dirs + [(d, Ad, dAd)])[-northo:] if northo else []
            it += 1
            hist.append(r.norm().item() / bn)
    return it, hist


def cg(system, rtol=1e-6, maxit=5000, jacobi=False):
    """Textbook (P)CG on the same operator; returns (iterations, history)."""
    A, b = system.op, system.b
    minv = 1.0 / A.diag if jacobi else None
    x = torch.zeros_like(b)
    r = b.clone()
    z = r * minv if jacobi else r
    p = z.clone()
    rz = (r * z).sum()
    bn = b.norm().item()
    hist = [1.0]
    it = 0
    while hist[-1] > rtol and it < maxit:
        Ap = A(p)
        alpha = rz / (p * Ap).sum()
        x += alpha * p
        r -= alpha * Ap
        z = r * minv if jacobi else r
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
        hist.append(r.norm().item() / bn)
    return it, hist


def evaluate(net, scenes, sizes, seeds, rtol=1e-6, maxit=500, device="cpu",
             dtype=torch.float32, baselines=True, progress=None, northo=DEFAULT_NORTHO, dim=3,
             kcycle=None):
    """Rows of {scene, n, dim, seed, dcdm, cg, cg_jacobi, dcdm_s} iteration
    counts on N³ grids, or N² with dim=2 (the scenes' 2D versions).
    `kcycle`: K-cycle levels (None: DCDM's default for the dimension)."""
    from .mgnet import MGNet, default_kcycle
    kc = {}
    if isinstance(net, MGNet):
        kc = {"kcycle": default_kcycle(dim) if kcycle is None else kcycle}
    rows = []
    for n in sizes:
        for scene in scenes:
            for seed in seeds:
                s = TorchSystem(scene, (n, n, n if dim == 3 else 1), seed, device)
                with torch.inference_mode():
                    kw = {} if s.stencil is None else {**s.stencil.network_kw(), **kc}
                    geo = net.prepare(s.flags, dirichlet_fraction(s.flags, s.faces),
                                      dtype=dtype, device=device, **kw)
                t = time.perf_counter()
                its, hist = dcdm(s, net, geo, rtol, maxit, northo=northo, dtype=dtype)
                row = {"scene": scene, "n": n, "dim": dim, "grid": f"{n}{'³' if dim == 3 else '²'}",
                       "seed": seed, "dcdm": its,
                       "dcdm_final": hist[-1], "dcdm_s": time.perf_counter() - t}
                if hist[-1] > rtol:
                    row["dcdm"] = f">{its}"
                if baselines:
                    row["cg"] = cg(s, rtol)[0]
                    row["cg_jacobi"] = cg(s, rtol, jacobi=True)[0]
                rows.append(row)
                if progress:
                    progress(row)
    return rows
