"""One exception type for bad input, and turning PETSc's multi-line error
tracebacks into one readable line."""
import contextlib


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class SetupError(RuntimeError):
    """Raised inside the KSP/PC Python contexts for unusable input (model
    file, grid, options). petsc4py passes it through PETSc to the caller
    unchanged (3.18) or as the __cause__ of a PETSc.Error (3.23 on):
    original_error() finds it either way."""


# Whether the caller prints SetupErrors itself (the deepcd CLI does). From a
# C program PETSc shows only an error code (-1 or 101, "error in Python
# code"), so by default the contexts print the message before PETSc unwinds.
CALLER_REPORTS = False


def reported(method):
    """Decorator for Python-context methods: print the message of an
    exception they raise (a SetupError on rank 0; any other Python
    exception, a bug, on its rank, with its type) as one line, before
    PETSc unwinds and shows only an error code; then re-raise it. PETSc's
    own errors are left to PETSc, which prints them. Each exception is
    printed once (solve calls setUp); not at all when the caller reports
    errors itself (CALLER_REPORTS: the deepcd CLI).

    It also drops the local variables of the failed call's frames. Those
    frames hold petsc4py handles (the KSP/PC, b, x) that keep the C
    objects alive: the exception outlives them (pytest keeps it, petsc4py
    >= 3.23 chains it to the PETSc.Error it raises), so the application's
    KSPDestroy freed nothing, and the garbage collector destroyed the
    Python-typed KSP after PetscFinalize: PETSc 3.18 crashed at exit
    (SEGV). The traceback keeps its file/line information."""
    import functools
    import traceback

    @functools.wraps(method)
    def wrapper(*args, **kw):
        try:
            return method(*args, **kw)
        except BaseException as e:
            if not CALLER_REPORTS:
                _print_once(e)
            traceback.clear_frames(e.__traceback__)
            args = kw = None  # noqa: F841 (this frame stays in the traceback)
            raise
    return wrapper


def _print_once(err):
    import sys
    from petsc4py import PETSc
    inner = original_error(err)
    if isinstance(inner, (PETSc.Error, KeyboardInterrupt, SystemExit)) or \
            getattr(inner, "_deepcd_reported", False):
        return
    comm = PETSc.COMM_WORLD
    if isinstance(inner, SetupError):
        if comm.getRank() == 0:
            print(f"deepcd_petsc error: {inner}", file=sys.stderr, flush=True)
    else:
        where = f"[rank {comm.getRank()}] " if comm.getSize() > 1 else ""
        print(f"deepcd_petsc error: {where}{error_message(inner)}", file=sys.stderr, flush=True)
    try:
        inner._deepcd_reported = True
    except AttributeError:
        pass


@contextlib.contextmanager
def petsc_errors(what):
    """Turn a PETSc.Error raised inside the block into a one-line UserError
    carrying PETSc's own message ("Unable to find requested KSP type foo"),
    and a SetupError of the Python contexts into one carrying its message,
    whether petsc4py passes it through (3.18) or wraps it (3.23: PETSc.Error
    code 101, the SetupError as __cause__). Any other Python exception from
    inside a context is re-raised as itself, with its traceback (a bug)."""
    from petsc4py import PETSc
    try:
        yield
    except (PETSc.Error, SetupError) as e:
        inner = original_error(e)
        if isinstance(inner, (SetupError, UserError)):
            raise UserError(f"{what}: {inner}") from None
        if isinstance(inner, PETSc.Error):
            raise UserError(f"{what}: {petsc_message(inner)}") from None
        raise inner from None


# PETSC_ERR_PYTHON: "error in Python code" of a Python context
ERR_PYTHON = 101


def original_error(err):
    """The exception behind `err`: petsc4py >= 3.23 raises an exception from
    inside a Python context (SetupError, or any other) as PETSc.Error code
    101 with the original as __cause__ (nested solvers: a chain of them);
    3.18 raises the original itself. Anything else is returned as it is."""
    from petsc4py import PETSc
    seen = set()
    while isinstance(err, PETSc.Error) and id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__
        if nxt is None and getattr(err, "ierr", None) == ERR_PYTHON:
            nxt = err.__context__
        if nxt is None:
            break
        err = nxt
    return err


def error_message(err):
    """One line for any exception a solve can raise: the original Python
    exception's message, or PETSc's own message."""
    from petsc4py import PETSc
    inner = original_error(err)
    if isinstance(inner, PETSc.Error):
        return petsc_message(inner)
    if isinstance(inner, (SetupError, UserError)):
        return str(inner)
    return f"{type(inner).__name__}: {inner}"


def petsc_message(err):
    """The informative lines of a PETSc traceback, without the
    function-location lines and documentation links."""
    lines = []
    for line in list(getattr(err, "_traceback_", None) or str(err).splitlines()):
        line = line.strip()
        if line.startswith("[") and "]" in line:
            line = line.split("]", 1)[1].strip()
        if not line or line.startswith("error code") or \
                (" at " in line and "()" in line) or \
                line.startswith("Unknown type. Check for miss-spelling") or \
                "petsc.org" in line or line.startswith("See "):
            continue
        lines.append(line)
    msg = "; ".join(dict.fromkeys(lines))
    return msg or f"PETSc error code {getattr(err, 'ierr', err)}"


def raise_on_all(comm, err, cls=SetupError):
    """Raise cls(first message) on every rank of the mpi4py `comm` when any
    rank has one (`err`: this rank's message or None), so that none waits
    in a collective the others left."""
    errs = [e for e in comm.allgather(err) if e]
    if errs:
        raise cls(errs[0])
