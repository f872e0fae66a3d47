"""The V-cycle network's fused inference kernels for GPUs, in Triton: the
same passes as kernels.c (one per smoothing half-step, restriction and
prolongation fused, the float64 cast folded into the first and last), on
the same zero-bordered (D+2, H+2, W+2) buffers, so mgnet.py drives both
through one interface (kernels.CKernels is the CPU twin).

Why: on a GPU the torch path launches six to ten elementwise kernels per
smoothing step; these are memory-bound, so one pass per step is the gain.
Used for float32 CUDA fields of one process (no halo); everything else
takes the torch path. Validated against the torch path and the C kernels
in the test suite through Triton's interpreter (TRITON_INTERPRET=1, CPU
tensors); timed on a GPU by examples/gpu_bench.py.
"""
import torch
import triton
import triton.language as tl


def _block(n):
    return max(16, min(256, triton.next_power_of_2(n)))


@triton.jit
def _cells(H, W, BLOCK: tl.constexpr):
    """This program's row segment of a (D, H, W) field: x, y, z, the flat
    index u, and q in the zero-bordered (D+2, H+2, W+2) buffers."""
    x = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.program_id(1)
    z = tl.program_id(2)
    u = (z * H + y) * W + x
    q = ((z + 1) * (H + 2) + y + 1) * (W + 2) + x + 1
    return x, y, z, u, q


@triton.jit
def _input(r, fluid, b, scale, H, W, d, h, w, BLOCK: tl.constexpr):
    x, y, z, u, q = _cells(H, W, BLOCK)
    m = x < W
    # r's cells: x < w on rows inside its (d, h) corner, none on the others
    inside = x < w * ((y < h) & (z < d)).to(tl.int32)
    rv = tl.load(r + (z * h + y) * w + x, mask=inside, other=0.0).to(tl.float32)
    f = tl.load(fluid + u, mask=m, other=0.0)
    tl.store(b + u, tl.where(inside, (rv * scale) * f, 0.0), mask=m)


@triton.jit
def _first(b, dinv, sp, H, W, BLOCK: tl.constexpr):
    x, y, z, u, q = _cells(H, W, BLOCK)
    m = x < W
    tl.store(sp + q, tl.load(dinv + u, mask=m) * tl.load(b + u, mask=m), mask=m)


@triton.jit
def _resid(xp, b, dinv, sp, H, W, BLOCK: tl.constexpr):
    x, y, z, u, q = _cells(H, W, BLOCK)
    m = x < W
    W2 = W + 2
    P = (H + 2) * W2
    c = tl.load(xp + q, mask=m, other=0.0)
    nb = (tl.load(xp + q - P, mask=m, other=0.0) + tl.load(xp + q + P, mask=m, other=0.0)
          + tl.load(xp + q - W2, mask=m, other=0.0) + tl.load(xp + q + W2, mask=m, other=0.0)
          + tl.load(xp + q - 1, mask=m, other=0.0) + tl.load(xp + q + 1, mask=m, other=0.0))
    s = (nb + tl.load(b + u, mask=m, other=0.0)) * tl.load(dinv + u, mask=m, other=0.0) - c
    tl.store(sp + q, s, mask=m)


@triton.jit
def _update(sp, g, q, u, m, H, W, w0, w1, w2, w3, w4, w5, w6):
    """g ∘ (w ∗ s): a smoothing step's update (kernels.c's term order)."""
    W2 = W + 2
    P = (H + 2) * W2
    return (tl.load(sp + q, mask=m, other=0.0) * w0
            + w1 * tl.load(sp + q - P, mask=m, other=0.0)
            + w2 * tl.load(sp + q + P, mask=m, other=0.0)
            + w3 * tl.load(sp + q - W2, mask=m, other=0.0)
            + w4 * tl.load(sp + q + W2, mask=m, other=0.0)
            + w5 * tl.load(sp + q - 1, mask=m, other=0.0)
            + w6 * tl.load(sp + q + 1, mask=m, other=0.0)) * tl.load(g + u, mask=m, other=0.0)


@triton.jit
def _step(sp, g, xp, w0, w1, w2, w3, w4, w5, w6, H, W, FIRST: tl.constexpr,
          BLOCK: tl.constexpr):
    x, y, z, u, q = _cells(H, W, BLOCK)
    m = x < W
    v = _update(sp, g, q, u, m, H, W, w0, w1, w2, w3, w4, w5, w6)
    if FIRST:
        tl.store(xp + q, v, mask=m)
    else:
        tl.store(xp + q, tl.load(xp + q, mask=m, other=0.0) + v, mask=m)


@triton.jit
def _step_out(sp, g, xp, out, w0, w1, w2, w3, w4, w5, w6, H, W, h, wd, BLOCK: tl.constexpr):
    x, y, z, u, q = _cells(H, W, BLOCK)
    m = x < wd
    v = tl.load(xp + q, mask=m, other=0.0) + _update(sp, g, q, u, m, H, W, w0, w1, w2, w3, w4,
                                                     w5, w6)
    tl.store(out + (z * h + y) * wd + x, v.to(tl.float64), mask=m)


@triton.jit
def _restrict(xp, b, diag, fluid, cmask, cb, H, W, BLOCK: tl.constexpr):
    X = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    Y = tl.program_id(1)
    Z = tl.program_id(2)
    Hc = H // 2
    Wc = W // 2
    m = X < Wc
    W2 = W + 2
    P = (H + 2) * W2
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for dz in tl.static_range(2):
        for dy in tl.static_range(2):
            z = 2 * Z + dz
            y = 2 * Y + dy
            for dx in tl.static_range(2):   # children 2X, 2X+1, in kernels.c's order
                x = 2 * X + dx
                u = (z * H + y) * W + x
                q = ((z + 1) * (H + 2) + y + 1) * W2 + x + 1
                c = tl.load(xp + q, mask=m, other=0.0)
                nb = (tl.load(xp + q - P, mask=m, other=0.0) + tl.load(xp + q + P, mask=m, other=0.0)
                      + tl.load(xp + q - W2, mask=m, other=0.0)
                      + tl.load(xp + q + W2, mask=m, other=0.0)
                      + tl.load(xp + q - 1, mask=m, other=0.0) + tl.load(xp + q + 1, mask=m, other=0.0))
                acc = acc + (tl.load(b + u, mask=m, other=0.0) - tl.load(fluid + u, mask=m, other=0.0)
                             * (tl.load(diag + u, mask=m, other=0.0) * c - nb))
    v = (Z * Hc + Y) * Wc + X
    tl.store(cb + v, acc * 0.125 * tl.load(cmask + v, mask=m, other=0.0), mask=m)


@triton.jit
def _prolong(e, fluid, xp, scale, H, W, BLOCK: tl.constexpr):
    x, y, z, u, q = _cells(H, W, BLOCK)
    m = x < W
    ec = tl.load(e + ((z // 2) * (H // 2) + y // 2) * (W // 2) + x // 2, mask=m, other=0.0)
    xo = tl.load(xp + q, mask=m, other=0.0)
    tl.store(xp + q, xo + scale * ec * tl.load(fluid + u, mask=m, other=0.0), mask=m)


class TritonKernels:
    """The fused V-cycle passes on torch tensors (CUDA, or CPU under
    TRITON_INTERPRET=1), with kernels.CKernels' interface: (D, H, W)
    fields, (D+2, H+2, W+2) bordered x/s buffers, a step's 7 taps as a
    float32 CPU tensor."""
    name = "Triton"

    @staticmethod
    def _grid(D, H, W):
        return (triton.cdiv(W, _block(W)), H, D)

    def input(self, r, scale, fluid, b):
        D, H, W = b.shape
        _input[self._grid(D, H, W)](r, fluid, b, float(scale), H, W, *r.shape, BLOCK=_block(W))

    def first(self, b, dinv, sp):
        D, H, W = b.shape
        _first[self._grid(D, H, W)](b, dinv, sp, H, W, BLOCK=_block(W))

    def resid(self, xp, b, dinv, sp):
        D, H, W = b.shape
        _resid[self._grid(D, H, W)](xp, b, dinv, sp, H, W, BLOCK=_block(W))

    def step(self, sp, w, g, xp, first):
        D, H, W = g.shape
        _step[self._grid(D, H, W)](sp, g, xp, *w.tolist(), H, W, FIRST=bool(first),
                                   BLOCK=_block(W))

    def step_out(self, sp, w, g, xp, out):
        D, H, W = g.shape
        d, h, wd = out.shape
        _step_out[(triton.cdiv(wd, _block(wd)), h, d)](sp, g, xp, out, *w.tolist(), H, W, h, wd,
                                                       BLOCK=_block(wd))

    def restrict(self, xp, b, diag, fluid, cmask, cb):
        D, H, W = b.shape
        Dc, Hc, Wc = cb.shape
        _restrict[(triton.cdiv(Wc, _block(Wc)), Hc, Dc)](xp, b, diag, fluid, cmask, cb, H, W,
                                                         BLOCK=_block(Wc))

    def prolong(self, e, scale, fluid, xp):
        D, H, W = fluid.shape
        _prolong[self._grid(D, H, W)](e, fluid, xp, float(scale), H, W, BLOCK=_block(W))

