#!/bin/sh
# Create the development environment once; a second run only checks it.
#   system: PETSc, petsc4py, MPI from Debian (apt) -- never built by pip
#   .venv:  /usr/bin/python3 --system-site-packages, torch==2.13.0 (CPU), -e .[test]
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SYSPY=/usr/bin/python3
APT_PKGS="python3-petsc4py python3-mpi4py petsc-dev openmpi-bin python3-scipy python3-matplotlib python3-tqdm python3-venv"

have_system() {
    [ -x "$SYSPY" ] && "$SYSPY" -c "import petsc4py, mpi4py, scipy, matplotlib, tqdm, venv, ensurepip" 2>/dev/null \
        && command -v mpiexec >/dev/null 2>&1 \
        && [ -f /usr/lib/petsc/lib/petsc/conf/petscvariables ]
}

if ! have_system; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing Debian packages: $APT_PKGS"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $APT_PKGS >/dev/null
    else
        echo "bootstrap: PETSc/petsc4py/MPI are missing. Run as root:" >&2
        echo "  apt-get update && apt-get install -y $APT_PKGS" >&2
        echo "(on a cluster: load your PETSc/petsc4py module and run 'pip install -e .' instead; see README)" >&2
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV (system site packages visible)"
    "$SYSPY" -m venv --system-site-packages "$VENV"
fi

# petsc4py is compiled against Debian's numpy: pin it so pip never upgrades it
CONSTRAINTS="$VENV/constraints.txt"
"$SYSPY" -c "import numpy; print('numpy==' + numpy.__version__)" > "$CONSTRAINTS"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "bootstrap: installing torch==2.13.0"
    "$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch==2.13.0
fi

STAMP="$VENV/.deepcd-installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
    echo "bootstrap: pip install -e .[test]"
    "$VENV/bin/pip" install -q --no-build-isolation -c "$CONSTRAINTS" -e ".[test]"
    touch "$STAMP"
fi
"$VENV/bin/python" -c "import petsc4py, torch, deepcd_petsc" || {
    echo "bootstrap: the environment in $VENV is broken; remove it and run again" >&2; exit 1; }
