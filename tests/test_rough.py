"""Rough coefficients: the learned gates (trained on smooth fields, where
they over-relax up to 2) are kept at most 1 at rough cells, when rough
cells are a large share of the grid (mgnet.rough_cells, ROUGH_SHARE)."""
import numpy as np
import torch

from deepcd_petsc import mgnet
from deepcd_petsc.coefficients import Coefficients, family
from deepcd_petsc.model import load_model
from deepcd_petsc.scenes import _empty, remove_isolated_fluid
from deepcd_petsc.stencil import from_coefficients

SHAPE = (32, 32, 32)   # perm at 16³ is rough at the cell scale (share 0.3)


def _stencil(k=None, fam=None, seed=1):
    if fam is not None:
        flags, faces, coef = family(fam, SHAPE, seed)
        flags = remove_isolated_fluid(flags, faces, coef.periodic)
    else:
        flags, faces = _empty(SHAPE, None), {"z+"}
        coef = Coefficients(k, np.ones(SHAPE[0]), np.ones(SHAPE[1]), np.ones(SHAPE[2]))
    return flags, from_coefficients(flags, faces, coef)


def _iid(decades, seed=5):
    return 10 ** (decades * np.random.default_rng(seed).standard_normal(SHAPE))


def _coef(st):
    return torch.as_tensor(st.packed().reshape((7,) + SHAPE)[1:][None], dtype=torch.float64)


def test_rough_cells_are_the_cells_with_unequal_opposite_couplings():
    c = torch.ones(1, 6, 2, 2, 2, dtype=torch.float64)
    c[0, 4, 0, 0, 0] = 5.0          # x- five times x+: rough
    c[0, 0, 1, 1, 1] = 3.0          # z- three times z+: not (ROUGH = 4)
    c[0, 2:4, 0, 1, 0] = 100.0      # both y faces strong (anisotropic): not
    c[0, 5, 1, 0, 1] = 0.0          # a wall beside x+: no pair, not
    c[0, 4, 1, 0, 1] = 50.0
    m = mgnet.rough_cells(c)
    assert m.shape == (1, 1, 2, 2, 2)
    assert m.nonzero().tolist() == [[0, 0, 0, 0, 0]]
    assert mgnet.rough_cells(torch.ones(1, 6, 2, 2, 2)) is None


def test_share_separates_cell_scale_noise_from_families():
    """The families (density's bubble walls included) stay far below the
    threshold; i.i.d. log-normal k of one decade far above it."""
    for fam in ("density", "perm", "aniso", "stretch", "periodic"):
        flags, st = _stencil(fam=fam)
        fl = torch.as_tensor(flags == 0, dtype=torch.float32)[None, None]
        assert mgnet.rough_share(_coef(st), fl) < mgnet.ROUGH_SHARE / 3, fam
    flags, st = _stencil(k=_iid(1.0))
    fl = torch.as_tensor(flags == 0, dtype=torch.float32)[None, None]
    assert mgnet.rough_share(_coef(st), fl) > 1.5 * mgnet.ROUGH_SHARE


def _gates(st, flags):
    net, _ = load_model()
    with torch.no_grad():
        geo = net.prepare(torch.as_tensor(flags), stencil=st.packed().reshape((7,) + SHAPE))
    return geo


def test_gates_clamped_only_on_rough_grids_and_only_at_rough_cells():
    flags, st = _stencil(k=_iid(1.0))
    geo = _gates(st, flags)
    assert geo["rough"] > mgnet.ROUGH_SHARE
    lv = geo["levels"][0]
    rough = mgnet.rough_cells(lv["coef"].double())
    g = torch.cat(lv["gates"], 1)
    assert float(g[rough.expand_as(g)].max()) <= 1.0
    assert float(g[(~rough & (lv["fluid"] > 0)).expand_as(g)].max()) > 1.0   # the rest keep theirs
    # a smooth field of a similar range: no clamp, its gates reach above 1
    flags, st = _stencil(fam="perm")
    geo = _gates(st, flags)
    assert geo["rough"] is None
    assert float(torch.cat(geo["levels"][0]["gates"], 1).max()) > 1.0


class _TwoRanks:
    """A halo whose allreduce adds another rank's (rough, active) counts."""

    def __init__(self, other):
        self.other = other

    def allreduce(self, t):
        return t + self.other


def test_share_is_summed_over_the_ranks():
    """One rank rough, the other smooth: the clamp follows the global share,
    the same on both (a rank-local share would differ)."""
    flags, st = _stencil(k=_iid(1.0))
    fl = torch.as_tensor(flags == 0, dtype=torch.float32)[None, None]
    c = _coef(st)
    rough = float((mgnet.rough_cells(c) & (fl > 0)).sum())
    active = float((fl > 0).sum())
    assert rough / active > mgnet.ROUGH_SHARE
    smooth_rank = torch.tensor([0.0, active], dtype=torch.float64)
    share = mgnet.rough_share(c, fl, _TwoRanks(smooth_rank))
    assert share == rough / (2 * active) < mgnet.ROUGH_SHARE
