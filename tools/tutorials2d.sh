#!/bin/sh
# PETSc's own 2D tutorials (ex50, ex29, ex32, ex66 from Debian's examples),
# built with PETSc's makefile, solved with CG + GAMG and with DCDM:
#   tools/tutorials2d.sh BUILD_DIR "257 1025" "1 2"
#   CASES="ex50 ex66" tools/tutorials2d.sh ...     (some of them)
# (iterations capped at 2000); prints one line per run: example, options, ranks, solver, iterations,
# reason, ||b||, ||b - Ax|| (PETSc's -ksp_view_final_residual), seconds.
set -e
DIR=${1:-/tmp/deepcd-tutorials2d}; SIZES=${2:-"257"}; RANKS=${3:-"1"}
PETSC_DIR=${PETSC_DIR:-$(python3 -c "import petsc4py; print(petsc4py.get_config()['PETSC_DIR'])")}
SRC=${TUTORIALS:-/usr/share/petsc/3.18/share/petsc/examples/src/ksp/ksp/tutorials}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DIR"
for f in ex50.c ex29.c ex32.c ex66.c makefile; do cp "$SRC/$f" "$DIR/"; done
(cd "$DIR" && make -s ex50 ex29 ex32 ex66 PETSC_DIR="$PETSC_DIR" >/dev/null)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
GAMG="-ksp_type cg -pc_type gamg -ksp_norm_type unpreconditioned"
DCDM="-python -ksp_type python -ksp_python_type deepcd_petsc.DCDM"
# nonsymmetric systems (ex66's mirror rows, ex29's row-wise rho): GMRES, GCR
GMRES_GAMG="-ksp_type gmres -pc_type gamg -ksp_norm_type unpreconditioned"
GCR_NET="-python -ksp_type gcr -pc_type python -pc_python_type deepcd_petsc.NetworkPC"
for n in $SIZES; do
  for p in $RANKS; do
    for case in ${CASES:-ex50 ex29 ex29_rho100 ex29_neumann ex32 ex32_nu ex66}; do
      case "$case" in   # the tutorials' own coefficient options
        ex29_rho100) case="ex29 -rho 100";; ex29_neumann) case="ex29 -bc_type neumann -rho 0.01";;
        ex32_nu) case="ex32 -nu 0.01";;
      esac
      solvers="GAMG DCDM"
      case "$case" in ex66|*rho\ 100*) solvers="$solvers GMRES_GAMG GCR_NET";; esac
      for s in $solvers; do
        eval opts=\$$s
        t0=$(date +%s.%N)
        out=$(cd "$DIR" && mpiexec -n $p ./$case -da_grid_x $n -da_grid_y $n -ksp_rtol 1e-6 -ksp_max_it 2000 $opts \
              -ksp_converged_reason -ksp_view_final_residual -ksp_monitor_true_residual 2>&1 | \
              grep -E "^ +0 KSP|converged|Converged|final norm|DIVERGED")
        t1=$(date +%s.%N)
        bn=$(echo "$out" | grep -m1 "0 KSP" | sed 's/.*true resid norm \([^ ]*\).*/\1/')
        its=$(echo "$out" | grep -i "solve" | sed 's/.*iterations \([0-9]*\).*/\1/')
        why=$(echo "$out" | grep -i "solve" | sed 's/.* due to \([A-Z_]*\).*/\1/')
        res=$(echo "$out" | grep "final norm" | sed 's/.*residual //')
        echo "$case | ${n}x$n | np $p | $s | its $its | $why | b $bn | res $res | $(echo "$t1 - $t0" | bc) s"
      done
    done
  done
done
