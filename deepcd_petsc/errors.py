"""One exception type for bad input, and turning PETSc's multi-line error
tracebacks into one readable line."""
import contextlib


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class SetupError(RuntimeError):
    """Raised inside the KSP/PC Python contexts for unusable input (model
    file, grid, options); petsc4py passes it through PETSc unchanged."""


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
