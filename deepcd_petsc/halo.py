"""Distributed evaluation support: an aligned block decomposition of the
padded grid and the halo exchange that each 3×3×3 convolution calls.

Why aligned blocks: the network pools 2×2×2 (levels-1) times (fewer along
the weak axes of a semi-coarsened operator); a rank's block must start and
end on multiples of the product of its pooling factors along each axis for
its pooled cells to be the serial ones. The user's DMDA split is arbitrary: evaluator.py uses it
as it is when it happens to be aligned, and otherwise moves the field to
this decomposition with one PETSc VecScatter each way.
"""
import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F


def _split(units, parts):
    """Contiguous near-equal split of `units` into `parts` (starts, in units)."""
    base, extra = divmod(units, parts)
    sizes = [base + (1 if i < extra else 0) for i in range(parts)]
    return np.concatenate([[0], np.cumsum(sizes)])


def plan_divisors(plan):
    """Cumulative (z, y, x) divisors of each level of a coarsening plan
    ((fz, fy, fx) per level), finest first: level l's cells are the grid's
    over divisors[l]."""
    divs = [(1, 1, 1)]
    for f in plan:
        divs.append(tuple(d * k for d, k in zip(divs[-1], f)))
    return divs


def level_padding(shape, plan, gather=None, unpadded=None):
    """(g, fine, coarse): how a grid of `shape` (z, y, x) is padded for a
    coarsening `plan` ((fz, fy, fx) per level). Without a gathered level
    (g None) the fine grid is padded to the product of all factors. With
    one, the fine grid is padded only to the divisors of level g (what the
    blocks align to), and level g, which every rank holds whole, to the
    factors of the levels below it (`coarse`, level g's padded shape): the
    padding then costs cells of a ≤ 32³ level, not a slab of the fine grid
    on the last rank of each axis (120³ on 27 ranks: the corner rank's
    block was 48³ instead of 40³). `gather`: mgnet.gather_level, decided on
    the fully padded grid's level sizes. `unpadded` (z, y, x): axes never
    padded (periodic ones: the wrap would see the padding; every axis of a
    coefficient level); their levels are floor(n / divisor) long
    (ragged_shape)."""
    shape = tuple(int(s) for s in shape)
    per = tuple(bool(p) for p in (unpadded or (False,) * 3))
    divs = plan_divisors(plan)

    def pad(n, m, p):
        return n if p else -(-n // m) * m

    full = tuple(pad(n, m, p) for n, m, p in zip(shape, divs[-1], per))
    g = None if gather is None else gather(
        [int(np.prod(ragged_shape(full, div))) for div in divs])
    if g is None:
        return None, full, None
    fine = tuple(pad(n, m, p) for n, m, p in zip(shape, divs[g], per))
    below = tuple(m // d for m, d in zip(divs[-1], divs[g]))
    coarse = tuple(pad(n // d, b, p) for n, d, b, p in zip(fine, divs[g], below, per))
    return g, fine, coarse


def ragged_shape(shape, divisor):
    """A level's shape: floor(n / d) per axis. Padded axes divide exactly;
    where an unpadded axis is odd, its last aggregate takes three
    cells (mgnet.fold_odd): floor(floor(n / 2) / 2) = floor(n / 4), so the
    levels of blocks and of the whole grid agree."""
    return tuple(int(n) // int(d) for n, d in zip(shape, divisor))


class Decomposition:
    """Px×Py×Pz blocks over the grid padded to `multiple`; ranks beyond
    Px·Py·Pz (when P has no fitting factorisation) hold no block."""

    def __init__(self, shape_xyz, multiple, size, rank, ranges=None, periodic=(False,) * 3,
                 plan=None, gather=None, unpadded=None):
        """`multiple`: the block alignment, one for all axes (2^(levels−1)),
        or None with `plan`: the network's coarsening factors per level,
        (fz, fy, fx) each (mgnet.coarsening_plan; semi-coarsened levels
        align each axis to its own multiple). `ranges`: the application's
        DMDA ownership (cells per process along x, y, z); used as it is when
        already aligned, so that no scatter is needed (evaluator.py).
        `periodic` (x, y, z): the halo wraps along those axes. `unpadded`
        (x, y, z; default: the periodic ones): axes not padded, whose last
        block ends at the grid's end, ragged (level_padding; the
        coefficient levels pad none). `gather`: the
        network's rule (mgnet.gather_level) for the first level computed
        whole on every rank; blocks then align only to that level's
        divisors, not to the coarsest level's, and the grid is padded only
        to them (level_padding, as serially): a DMDA split such as 40³ per
        rank stays the blocks (instead of 48/32 for alignment 16), and more
        ranks hold one."""
        self.shape = tuple(int(s) for s in shape_xyz)
        self.periodic = tuple(bool(p) for p in periodic)
        if plan is None:
            plan = [(2, 2, 2)] * (int(multiple).bit_length() - 1)
        self.plan = [tuple(f) for f in plan]
        self.divisors = plan_divisors(self.plan)
        self.multiples = tuple(reversed(self.divisors[-1]))       # (x, y, z)
        self.multiple = max(self.multiples)
        self.unpadded = self.periodic if unpadded is None else tuple(bool(u) for u in unpadded)
        self.gather_from, fine, coarse = level_padding(self.shape[::-1], self.plan, gather,
                                                       self.unpadded[::-1])
        self.padded = fine[::-1]
        # level gather_from's whole (z, y, x) shape, padded for the levels below
        self.gathered_shape = coarse
        if self.gather_from is not None:
            # blocks: whole cells down to the gathered level, which is cut
            # back to them (own_block); the coarser levels run whole
            self.multiples = tuple(reversed(self.divisors[self.gather_from]))
        # (an unpadded axis: the last block takes the remainder,
        # which holds the three-cell last aggregates)
        units = [max(p // m, 1) for p, m in zip(self.padded, self.multiples)]
        self.rank = rank
        if ranges is not None and self._use_aligned(ranges, size):
            return
        best = None
        for px, py, pz in itertools.product(*(range(1, min(u, size) + 1) for u in units)):
            n = px * py * pz
            if n > size:
                continue
            # most ranks first, then the smallest largest block, then least surface
            vol = max(-(-units[0] // px), 1) * max(-(-units[1] // py), 1) * max(-(-units[2] // pz), 1)
            surf = px * units[1] * units[2] + py * units[0] * units[2] + pz * units[0] * units[1]
            key = (-n, vol, surf)
            if best is None or key < best[0]:
                best = (key, (px, py, pz))
        self.procs = best[1]
        self.active_ranks = int(np.prod(self.procs))
        self.starts = [np.concatenate([_split(u, p)[:-1] * m, [n]])
                       for u, p, m, n in zip(units, self.procs, self.multiples, self.padded)]
        self._place()

    def _use_aligned(self, ranges, size):
        sizes = [np.asarray(r, dtype=int) for r in ranges]
        # the last block of a ragged axis must hold its last aggregate at
        # every level: it starts at most one multiple before the last one
        if int(np.prod([len(r) for r in sizes])) != size or any(
                (r[:-1] % m).any() or r[:-1].sum() > max(n // m - 1, 0) * m
                for r, m, n in zip(sizes, self.multiples, self.padded)):
            return False
        self.procs = tuple(len(r) for r in sizes)
        self.active_ranks = size
        # the last block of each axis reaches to the padded size
        self.starts = [np.concatenate([[0], np.cumsum(r)[:-1], [pad]])
                       for r, pad in zip(sizes, self.padded)]
        self._place()
        return True

    def _place(self):
        rank = self.rank
        self.active = rank < self.active_ranks
        if self.active:
            px, py, _ = self.procs
            self.coords = (rank % px, (rank // px) % py, rank // (px * py))
            self.block = tuple((int(self.starts[d][c]), int(self.starts[d][c + 1]))
                               for d, c in enumerate(self.coords))
        else:
            self.coords, self.block = None, ((0, 0),) * 3

    @property
    def real_block(self):
        """The part of this rank's block inside the unpadded grid."""
        return tuple((lo, min(hi, n)) if lo < n else (lo, lo)
                     for (lo, hi), n in zip(self.block, self.shape))

    def neighbour(self, axis, step):
        """Rank of the neighbouring block along axis (0=x, 1=y, 2=z), or
        None; across a periodic boundary the block on the other side (this
        rank itself when it spans the axis)."""
        c = list(self.coords)
        c[axis] += step
        if self.periodic[axis]:
            c[axis] %= self.procs[axis]
        elif not 0 <= c[axis] < self.procs[axis]:
            return None
        px, py, _ = self.procs
        return c[0] + px * (c[1] + py * c[2])


class HaloExchange:
    """Adds a w-cell halo from the 26 neighbours to a (..., D, H, W) block:
    three phases (x, then y including x-ghosts, then z including both) fill
    faces, edges and corners with 6 pairwise MPI Sendrecv calls. Zeros on the
    global boundary, as zero padding gives on one process; the other side's
    cells across a periodic one (mgnet.WrapPad on one process)."""

    def __init__(self, decomposition, mpicomm):
        from mpi4py import MPI
        self.dec = decomposition
        self.comm = mpicomm
        # the ranks holding a block, for gathering a coarse level
        self.active_comm = mpicomm.Split(0 if decomposition.active else MPI.UNDEFINED,
                                         decomposition.rank)
        self.seconds = 0.0
        self.bytes = 0
        self.calls = 0

    def level_shape(self, level):
        """(D, H, W) of the whole padded grid at a coarse level (from the
        gathered level on, with the padding added there)."""
        d = self.dec
        g = d.gather_from
        if g is not None and level >= g:
            return ragged_shape(d.gathered_shape, (b // a for a, b in zip(d.divisors[g], d.divisors[level])))
        return ragged_shape(reversed(d.padded), d.divisors[level])

    def _level_offset(self, level):
        (x0, _), (y0, _), (z0, _) = self.dec.block
        return tuple(v // d for v, d in zip((z0, y0, x0), self.dec.divisors[level]))

    def gather_level(self, x, level):
        """The whole level-`level` field on every active rank from the
        ranks' blocks (one allgather); exactly the serial coarse field."""
        t0 = time.perf_counter()
        wire = x.detach().to("cpu", torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
        parts = self.active_comm.allgather((self._level_offset(level), wire.numpy()))
        out = torch.zeros(x.shape[:2] + self.level_shape(level), dtype=x.dtype, device=x.device)
        for (oz, oy, ox), arr in parts:
            d, h, w = arr.shape[-3:]
            out[..., oz:oz + d, oy:oy + h, ox:ox + w] = torch.from_numpy(arr).to(out)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out

    def allreduce(self, t):
        """Sum of a small tensor over the active ranks."""
        from mpi4py import MPI
        t0 = time.perf_counter()
        a = t.detach().to("cpu", torch.float64).numpy()
        out = np.empty_like(a)
        self.active_comm.Allreduce(a, out, op=MPI.SUM)
        self.seconds += time.perf_counter() - t0
        return torch.from_numpy(out).to(t)

    def allreduce_max(self, t):
        """Maximum of a small float64 tensor over the active ranks."""
        from mpi4py import MPI
        a = t.detach().to("cpu", torch.float64).numpy()
        out = np.empty_like(a)
        self.active_comm.Allreduce(a, out, op=MPI.MAX)
        return torch.from_numpy(out)

    def own_block(self, x, level):
        """This rank's block of a whole-level field."""
        (x0, x1), (y0, y1), (z0, z1) = self.dec.block
        fz, fy, fx = self.dec.divisors[level]
        return x[..., z0 // fz:z1 // fz, y0 // fy:y1 // fy, x0 // fx:x1 // fx]

    def __call__(self, x, w):
        return self.fill(F.pad(x, (w,) * 6), w)

    def fill(self, out, w):
        """Fill the w-cell border of an already padded block in place (the
        fused kernels keep their fields in such buffers); returns it."""
        t0 = time.perf_counter()
        device = out.device
        host = out if device.type == "cpu" else out.cpu()
        wire = host.view(torch.int16) if host.dtype == torch.bfloat16 else host
        arr = wire.numpy()
        # array axes: -1 = x, -2 = y, -3 = z
        for axis in range(3):
            ax = arr.ndim - 1 - axis
            inner = [slice(None)] * arr.ndim
            for later in range(axis + 1, 3):  # axes not yet exchanged: interior only
                inner[arr.ndim - 1 - later] = slice(w, -w)
            for step in (-1, 1):
                dst = self.dec.neighbour(axis, step)
                src = self.dec.neighbour(axis, -step)
                if dst is None and src is None:
                    continue       # no neighbour along this axis: ghosts stay zero
                send = list(inner)
                recv = list(inner)
                n = arr.shape[ax]
                if step == -1:   # send my low interior slab down, receive high ghosts
                    send[ax] = slice(w, 2 * w)
                    recv[ax] = slice(n - w, n)
                else:            # send my high interior slab up, receive low ghosts
                    send[ax] = slice(n - 2 * w, n - w)
                    recv[ax] = slice(0, w)
                # slabs across the slowest axis are contiguous: received in
                # place, the others through a buffer
                rview = arr[tuple(recv)]
                direct = rview.flags.c_contiguous
                rbuf = rview if direct else np.empty_like(rview)
                # at the ends of the line of blocks only one direction moves
                if dst is None:
                    self.comm.Recv(rbuf, source=src)
                elif src is None:
                    sbuf = np.ascontiguousarray(arr[tuple(send)])
                    self.comm.Send(sbuf, dest=dst)
                else:
                    sbuf = np.ascontiguousarray(arr[tuple(send)])
                    self.comm.Sendrecv(sbuf, dest=dst, recvbuf=rbuf, source=src)
                if src is not None and not direct:
                    arr[tuple(recv)] = rbuf
                if dst is not None:
                    self.bytes += sbuf.nbytes
        if device.type != "cpu":
            out.copy_(host)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out


def halo_cost(net, block, bytes_per_value=4, levels=None, gather_from=None, grid=None):
    """Per network application on one rank with a cubic block of side
    `block` (fine cells): (halo bytes sent, convolution FLOPs, number of
    halo exchanges); `levels` for networks whose depth follows the grid;
    `gather_from`: the level from which the whole (gathered) level is
    computed on every rank (one allgather, no exchanges or halo bytes; its
    FLOPs are those of the whole level of the cubic grid of side `grid`).
    Halo: three phases send 2b², 2b(b+2), 2(b+2)² values per channel (faces,
    then edges, then corners)."""
    sent = flops = 0
    exchanges = 0
    for level, cin, cout, k, *taps in net.conv_plan(levels):
        whole = gather_from is not None and level >= gather_from
        b = max((grid if whole and grid else block) // 2 ** level, 1)
        flops += 2 * (taps[0] if taps else k ** 3) * cin * cout * b ** 3
        if k > 1 and not whole:
            exchanges += 1
            sent += (2 * b * b + 2 * b * (b + 2) + 2 * (b + 2) ** 2) * cin * bytes_per_value
    return sent, flops, exchanges
