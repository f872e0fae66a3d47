"""Applying the network to PETSc Vecs of a 3D DMDA, on one rank or many.

One rank: a zero-copy NumPy view of the Vec becomes a torch tensor; the only
copy is the dtype cast, and with MGNet's CPU kernels not even that: its
first pass reads the float64 Vec and its last writes the float64 result. Several ranks: one VecScatter moves the field to the
aligned blocks of halo.Decomposition (none when the application's DMDA
split is already aligned: its blocks are used as they are), each rank runs
the same nn.Module on its block with halo exchanges before every 3×3×3
convolution, and the reverse scatter brings the result back. No rank ever
holds the whole field.
"""
import time
import warnings

import numpy as np
import torch

from .halo import Decomposition, HaloExchange
from .scenes import SOLID


def _view(a):
    """torch view of a NumPy array, read-only ones included (they are only
    read; torch warns about them otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _gather_rule(net):
    """MGNet computes its coarse levels whole from mgnet.gather_level's
    level on: its blocks need only align to that level."""
    from .mgnet import MGNet, gather_level
    return gather_level if isinstance(net, MGNet) else None


def _tensor(a):
    return None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float32))


class NetworkEvaluator:
    """y = f(x) for DMDA-layout Vecs. `flags_local`: this rank's (zm, ym, xm)
    block of cell flags in the user's DMDA layout."""

    def __init__(self, net, da, flags_local, dirichlet_local=None, dtype=torch.float32, device="cpu",
                 stencil_local=None, periodic=None, kcycle=False):
        from petsc4py import PETSc
        self.kcycle = kcycle
        self.net, self.dtype, self.device = net, dtype, torch.device(device)
        self.comm = da.getComm()
        self.shape = tuple(da.getSizes())          # (nx, ny, nz)
        (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
        self.local_shape = (ze - zs, ye - ys, xe - xs)
        from .mgnet import MGNet
        self._reuse = {"reuse": True} if isinstance(net, MGNet) else {}
        # the cast folded into the network's own passes (MGNet's CPU kernels)
        self.direct = isinstance(net, MGNet) and self.device.type == "cpu" \
            and dtype == torch.float32
        self.forward_s = 0.0
        self.calls = 0
        self.halo = None
        if self.comm.getSize() == 1:
            self.dec = None
            flags = torch.as_tensor(np.ascontiguousarray(flags_local, dtype=np.int8))
            with torch.inference_mode():
                self.geo = net.prepare(flags, _tensor(dirichlet_local), dtype=dtype,
                                       device=self.device, **self._stencil_kw(stencil_local, periodic))
            return
        from .layout import Layout
        mpicomm = self.comm.tompi4py()
        per_xyz = tuple(periodic[::-1]) if periodic is not None else (False,) * 3
        self.dec = Decomposition(self.shape, net.multiple_for(self.shape, per_xyz), self.comm.getSize(),
                                 self.comm.getRank(), ranges=da.getOwnershipRanges(),
                                 periodic=per_xyz,
                                 plan=self._plan(net, stencil_local, periodic, mpicomm),
                                 gather=_gather_rule(net),
                                 # coefficient levels pad no axis (mgnet.prepare)
                                 unpadded=(stencil_local is not None,) * 3)
        # the application's split is already aligned: its blocks are ours,
        # and apply() reads and writes the Vecs without the VecScatter
        box = ((xs, xe), (ys, ye), (zs, ze))
        from mpi4py import MPI
        self.identity = mpicomm.allreduce(self.dec.active and self.dec.real_block == box,
                                          op=MPI.LAND)
        (bx0, bx1), (by0, by1), (bz0, bz1) = self.dec.real_block
        self.real_shape = (bz1 - bz0, by1 - by0, bx1 - bx0)
        self.scatter = self.work = user = None
        if not self.identity:
            # (an aligned split needs none of this: index arrays, the
            # scatter and its work Vec cost ~60 bytes a cell)
            k, j, i = np.meshgrid(np.arange(bz0, bz1), np.arange(by0, by1),
                                  np.arange(bx0, bx1), indexing="ij")
            src = Layout.from_da(da).petsc_index(k, j, i).ravel().astype(PETSc.IntType)
            del k, j, i
            self.work = PETSc.Vec().createMPI((src.size, PETSc.DECIDE), comm=self.comm)
            lo, _ = self.work.getOwnershipRange()
            is_from = PETSc.IS().createGeneral(src, comm=self.comm)
            is_to = PETSc.IS().createStride(src.size, lo, 1, comm=self.comm)
            user = da.createGlobalVec()
            self.scatter = PETSc.Scatter().create(user, is_from, self.work, is_to)
            is_from.destroy()
            is_to.destroy()
            del src
        # geometry travels the same way, as floats
        self.inner = inner = tuple(slice(0, s) for s in self.real_shape)
        block = np.full(self._block_shape(), SOLID, np.int8)
        dblock = np.zeros(self._block_shape()) if dirichlet_local is not None else None
        fields = [(flags_local, block), (dirichlet_local, dblock)]
        sblock = None
        if stencil_local is not None:
            sblock = np.zeros((7,) + self._block_shape())
            fields += [(stencil_local[c], sblock[c]) for c in range(7)]
        for field, out in fields:
            if field is None:
                continue
            if user is None:      # this rank's DMDA block is its network block
                out[inner] = np.asarray(field).reshape(self.real_shape)
                continue
            with user as ua:
                ua.reshape(self.local_shape)[...] = field
            self._to_blocks(user)
            out[inner] = self.work.getArray(readonly=True).reshape(self.real_shape)
        if user is not None:
            user.destroy()
        self.halo = HaloExchange(self.dec, mpicomm)
        self._block = None
        if self.dec.active:
            with torch.inference_mode():
                self.geo = self.net.prepare(torch.as_tensor(block), _tensor(dblock), dtype=dtype,
                                            device=self.device, halo=self.halo,
                                            **self._stencil_kw(sblock, periodic))

    def _plan(self, net, stencil_local, periodic, mpicomm):
        """The network's coarsening plan for the whole grid, from the
        operator's axis strengths summed over the ranks (the same on every
        rank, and the serial plan); None: uniform alignment."""
        from .mgnet import MGNet, axis_strengths
        if not isinstance(net, MGNet):
            return None
        strengths = None
        if stencil_local is not None:
            from mpi4py import MPI
            mine = axis_strengths(np.asarray(stencil_local).reshape((7,) + self.local_shape))
            strengths = np.empty_like(mine)
            mpicomm.Allreduce(mine, strengths, op=MPI.SUM)
        shape_zyx = self.shape[::-1]
        return net.plan_for(shape_zyx, periodic, strengths)

    def _stencil_kw(self, st, periodic=None):
        """prepare()'s stencil and periodic arguments: only networks that
        read operators (MGNet) take them."""
        if st is None:
            if periodic is not None and any(periodic):
                from .errors import SetupError
                raise SetupError("periodic axes need the operator's coefficients (no flags path)")
            return {}
        from .mgnet import MGNet
        if not isinstance(self.net, MGNet):
            from .errors import SetupError
            raise SetupError("this model (a U-Net) reads cell flags only; operators with "
                             "coefficients need a V-cycle model")
        return {"stencil": torch.as_tensor(np.ascontiguousarray(st, dtype=np.float64)),
                "periodic": periodic, "kcycle": self.kcycle}

    def _block_shape(self):
        (x0, x1), (y0, y1), (z0, z1) = self.dec.block
        return (z1 - z0, y1 - y0, x1 - x0)

    def _to_blocks(self, vec):
        from petsc4py import PETSc
        self.scatter.scatter(vec, self.work, PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)

    def _run(self, r):
        """f(r) for r already in the network's dtype and device: (D, H, W)."""
        t = time.perf_counter()
        with torch.inference_mode():
            # the result is copied out at once: the net may return its buffer
            y = self.net(r[None, None], self.geo, **self._reuse)[0, 0]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.forward_s += time.perf_counter() - t
        self.calls += 1
        return y

    def _direct(self, xa, ya, scale):
        """y = f(scale·x) with the cast inside the network's first and last
        passes (MGNet's fused CPU path), where it applies; else False."""
        if not self.direct:
            return False
        t = time.perf_counter()
        with torch.inference_mode():
            done = self.net.apply_into(xa, ya, self.geo, scale)
        if done:
            self.forward_s += time.perf_counter() - t
            self.calls += 1
        return done

    def unscaled_ok(self, scale):
        """Whether f(x) may run unscaled instead of f(scale·x)/scale: the
        network is positively homogeneous, so scaling only protects the
        range of float32/bfloat16, and 1/scale (a global norm) far inside
        it needs no pass. Same answer on every rank."""
        return self.dtype == torch.float64 or 1e-12 <= scale <= 1e12

    def apply(self, x, y, scale=1.0, views=None):
        """y = f(scale·x): PETSc Vecs in the DMDA layout. One copy in (the
        cast to the network's dtype, scaled), one copy out, or none
        (_direct). `views`: torch
        views (x, y) of the Vecs' local arrays when the caller has them."""
        from petsc4py import PETSc
        if self.dec is None:
            if views is not None:
                xa, ya = (v.view(self.local_shape) for v in views)
            else:
                xa = _view(x.getArray(readonly=True).reshape(self.local_shape))
                ya = torch.from_numpy(y.getArray().reshape(self.local_shape))
            if self._direct(xa, ya, scale):
                return
            r = xa.to(device=self.device, dtype=self.dtype, copy=True)
            out = self._run(r if scale == 1.0 else r.mul_(scale))
            with torch.inference_mode():
                ya.copy_(out)
            return
        if self.identity:
            self._apply_block(x.getArray(readonly=True).reshape(self.real_shape),
                              y.getArray().reshape(self.real_shape), scale)
            return
        self._to_blocks(x)
        wa = self.work.getArray().reshape(self.real_shape)
        self._apply_block(wa, wa, scale)
        self.work.stateIncrease()   # written through its array (PETSc 3.26 does not see it)
        self.scatter.scatter(self.work, y, PETSc.InsertMode.INSERT, PETSc.ScatterMode.REVERSE)

    def _apply_block(self, xa, ya, scale):
        """This rank's block: NumPy views of the input and output (they may
        be the same array)."""
        if self.dec.active:
            if self._direct(_view(xa), torch.from_numpy(ya), scale):
                return
            with torch.inference_mode():
                if self._block is None:   # kept: its padding beyond the grid stays zero
                    self._block = torch.zeros(self._block_shape(), dtype=self.dtype,
                                              device=self.device)
                block = self._block
                block[self.inner] = _view(xa)
                out = self._run(block if scale == 1.0 else block.mul_(scale))
                torch.from_numpy(ya).copy_(out[self.inner])

    def destroy(self):
        if self.dec is not None and self.scatter is not None:
            self.scatter.destroy()
            self.work.destroy()
