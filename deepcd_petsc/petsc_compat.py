"""The PETSc/petsc4py version differences this package meets, in one place.

Tested with Debian's PETSc/petsc4py 3.18 and PETSc/petsc4py 3.26 built from
PyPI (tools/petsc_latest.sh); what changed in between:

- KSPSetDMActive gained a first argument in 3.25 (which of operators,
  right-hand side, initial guess the DM supplies): set_dm_inactive().
- Mat.getNullSpace() returns an empty NullSpace handle, never None, when
  the matrix has none; `is not None` does not tell: null_space().
- Writing through Vec.getArray() no longer increases the Vec's state (3.26):
  PETSc then returns cached norms of the old values. Write through
  `with vec as a:` (restores the array and increases the state on exit) or
  call vec.stateIncrease() after writing.
- An exception raised inside a Python context reaches the caller as
  PETSc.Error (code 101) with the original as __cause__ (3.23):
  errors.original_error().
- DMDA.createMatrix/getMatrix are gone (3.26): DM.createMat (in 3.18 too).
- petsc4py 3.18 finalizes PETSc after the Python interpreter is gone: a
  KSP/PC of type python still alive at exit (a script that does not
  destroy its solver) is destroyed then and calls into the dead
  interpreter (SEGV in PyThreadState_New). 3.26 does not:
  finalize_before_teardown().
"""
import atexit

_finalize_registered = False


def finalize_before_teardown():
    """On petsc4py < 3.19, finalize PETSc in a Python atexit handler (once,
    when the first DCDM/NetworkPC context is made), so that solvers a
    script leaves alive are not destroyed after the interpreter. Objects
    still referenced then are left to the process exit (PETSc skips their
    destruction once finalized)."""
    global _finalize_registered
    if _finalize_registered:
        return
    _finalize_registered = True
    import sys
    import petsc4py
    if tuple(int(v) for v in petsc4py.__version__.split(".")[:2]) >= (3, 19):
        return
    # only where Python is the program (petsc4py initialized PETSc): in a C
    # code's -python interpreter (sys.orig_argv empty) PetscFinalize runs
    # this very atexit from inside itself
    if not getattr(sys, "orig_argv", None):
        return

    def finalize():
        import gc
        from petsc4py import PETSc
        gc.collect()              # what nothing references goes the normal way first
        if PETSc.Sys.isInitialized() and not PETSc.Sys.isFinalized():
            PETSc._finalize()
    atexit.register(finalize)


def set_dm_inactive(ksp):
    """KSPSetDMActive(ksp, false) for every use of the DM: the operators,
    right-hand side and initial guess are the application's, the DM only
    describes the grid."""
    from petsc4py import PETSc
    which = getattr(PETSc.KSP, "DMActive", None)
    if which is None:            # petsc4py < 3.25: setDMActive(flag)
        ksp.setDMActive(False)
    else:                        # 3.25: setDMActive(which, flag)
        ksp.setDMActive(which.ALL, False)


def null_space(mat):
    """The NullSpace attached to `mat`, or None when it has none."""
    ns = mat.getNullSpace()
    return ns if ns is not None and bool(ns) else None


def pc_type_available(pc_type, comm=None):
    """Whether this PETSc build has the preconditioner `pc_type` (hypre,
    ml, ... exist only where PETSc was configured with them)."""
    from petsc4py import PETSc
    pc = PETSc.PC().create(comm or PETSc.COMM_SELF)
    try:
        pc.setType(pc_type)
        return True
    except PETSc.Error:
        return False
    finally:
        pc.destroy()
