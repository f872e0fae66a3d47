"""DCDM's work vectors: PETSc Vecs whose memory is rows of one float64
torch tensor, so the Krylov arithmetic runs as fused kernels (kernels.c;
torch operations where no compiler is available) on the Vecs themselves,
while MatMult, the null space and the network see plain Vecs.

Why: with a network that costs ~3 MatMults, PETSc's vector kernels were a
fifth of an iteration (Debian's PETSc links the reference BLAS: a dot
product at 64³ costs 0.13 ms, torch's 0.03 ms), and one pass per
operation is most of the rest. Dot products stay global: local partial
sums, added over the ranks with one MPI allreduce per group, as
VecDot/VecNorm do (real double-precision PETSc only).
"""
import ctypes

import numpy as np
import torch
from petsc4py import PETSc

from . import kernels
from .errors import SetupError
from .kernels import pointers


class Workspace:
    def __init__(self, sizes, bsize, comm, count):
        """`count` Vecs of layout (local, global) `sizes`, like A's rows."""
        if np.dtype(PETSc.ScalarType) != np.float64:
            raise SetupError(f"DCDM needs PETSc with real double scalars, this one has "
                             f"{np.dtype(PETSc.ScalarType)}")
        self.sizes = tuple(sizes)
        self.count = count
        self.buf = torch.zeros((count, self.sizes[0]), dtype=torch.float64, device="cpu")
        self.rows = list(self.buf)
        self.vecs = [PETSc.Vec().createWithArray(row.numpy(), size=self.sizes,
                                                 bsize=bsize, comm=comm)
                     for row in self.rows]
        self.mpi = comm.tompi4py() if comm.getSize() > 1 else None
        self.lib = kernels.load()

    def fits(self, sizes, count):
        return tuple(sizes) == self.sizes and count == self.count

    def _global(self, local):
        if self.mpi is None:
            return local
        from mpi4py import MPI
        out = np.array(local, dtype=np.float64)
        self.mpi.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out.tolist()

    def dots(self, a, bs):
        """[aᵀb for b in bs], global, in one pass and one reduction."""
        if self.lib is not None and 0 < len(bs) <= kernels.MAXK:
            out = (ctypes.c_double * len(bs))()
            self.lib.deepcd_dots(a.numel(), a.data_ptr(), len(bs), pointers(bs), out,
                                 torch.get_num_threads())
            return self._global(list(out))
        return self._global([torch.dot(a, b).item() for b in bs])

    def norm(self, a):
        return self.dots(a, [a])[0] ** 0.5

    def orthogonalise(self, c, ps, qs, d, q, r):
        """d −= Σ c_j p_j and q −= Σ c_j q_j (a direction and its image
        under A); returns the global (dᵀr, dᵀq) of the result."""
        if self.lib is not None and len(ps) <= kernels.MAXK:
            out = (ctypes.c_double * 2)()
            self.lib.deepcd_orth_update(d.numel(), len(ps), (ctypes.c_double * len(c))(*c),
                                        pointers(ps), pointers(qs), d.data_ptr(),
                                        q.data_ptr(), r.data_ptr(), out, torch.get_num_threads())
            return self._global(list(out))
        for cj, p, pq in zip(c, ps, qs):
            d.add_(p, alpha=-cj)
            q.add_(pq, alpha=-cj)
        return self._global([torch.dot(d, r).item(), torch.dot(d, q).item()])

    def step(self, alpha, x, d, r, q):
        """x += α d, r −= α q; returns the global ‖r‖ after the update."""
        if self.lib is not None:
            out = (ctypes.c_double * 1)()
            self.lib.deepcd_step(x.numel(), alpha, x.data_ptr(), d.data_ptr(), r.data_ptr(),
                                 q.data_ptr(), out, torch.get_num_threads())
            return self._global(list(out))[0] ** 0.5
        x.add_(d, alpha=alpha)
        r.add_(q, alpha=-alpha)
        return self.norm(r)

    def all_finite_nonzero(self, a):
        """Every entry finite, and one nonzero, on all ranks together."""
        flags = np.array([bool(torch.isfinite(a).all()), bool((a != 0).any())])
        if self.mpi is not None:
            from mpi4py import MPI
            flags = np.array([self.mpi.allreduce(flags[0], op=MPI.LAND),
                              self.mpi.allreduce(flags[1], op=MPI.LOR)])
        return bool(flags.all())

    def destroy(self):
        for v in self.vecs:
            v.destroy()
        self.vecs, self.rows, self.buf = [], [], None


class VecView:
    """A torch view of a user Vec's local array for the length of a `with`
    (the writer bumps the Vec's state after each change, so PETSc drops
    cached norms; once more on exit)."""

    def __init__(self, vec):
        self.vec = vec

    def __enter__(self):
        self.array = self.vec.getArray()
        return torch.from_numpy(self.array)

    def __exit__(self, *exc):
        del self.array
        self.vec.stateIncrease()
