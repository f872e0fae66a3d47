"""One exception type for bad input, and turning PETSc's multi-line error
tracebacks into one readable line."""
import contextlib


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class SetupError(RuntimeError):
    """Raised inside the KSP/PC Python contexts for unusable input (model
    file, grid, options); petsc4py passes it through PETSc unchanged."""


# Whether the caller prints SetupErrors itself (the deepcd CLI does). From a
# C program PETSc shows only "error code -1", so by default the contexts
# print the message before PETSc unwinds.
CALLER_REPORTS = False


def reported(method):
    """Decorator for Python-context methods: print a SetupError's message
    (rank 0) before re-raising it into PETSc."""
    import functools
    import sys

    @functools.wraps(method)
    def wrapper(*args, **kw):
        try:
            return method(*args, **kw)
        except SetupError as e:
            if not CALLER_REPORTS:
                from petsc4py import PETSc
                if PETSc.COMM_WORLD.getRank() == 0:
                    print(f"deepcd_petsc error: {e}", file=sys.stderr, flush=True)
            raise
    return wrapper


@contextlib.contextmanager
def petsc_errors(what):
    """Turn a PETSc.Error raised inside the block into a one-line UserError
    carrying PETSc's own message ("Unable to find requested KSP type foo")."""
    from petsc4py import PETSc
    try:
        yield
    except PETSc.Error as e:
        raise UserError(f"{what}: {petsc_message(e)}") from None
    except SetupError as e:
        raise UserError(f"{what}: {e}") from None


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
