# make demo | make test | make bench -- each creates .venv first when missing
# make test-petsc-latest -- the suite against PETSc/petsc4py 3.26.1 built from
#   PyPI into ~/.cache/deepcd-petsc-3.26 (once, ~25 min on 2 cores; see README)
VENV ?= .venv
PY := $(VENV)/bin/python
# test files for test-petsc-latest (default: all of tests/)
LATEST_TESTS ?= tests

.PHONY: env test demo bench bench-fair clean petsc-latest test-petsc-latest

env:
	@VENV=$(VENV) sh tools/bootstrap.sh

test: env
	$(PY) -m pytest -q tests

# the cached PETSc 3.26.1 venv (built when missing; a second run only checks it)
petsc-latest:
	@bash tools/petsc_latest.sh

# the repository on PYTHONPATH (the venv serves every checkout); the C
# example links the pip-built PETSc (tests read petsc4py.get_config())
test-petsc-latest: petsc-latest
	PY=$$(bash tools/petsc_latest.sh --print) && \
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $$PY -m pytest -q $(LATEST_TESTS)

# DCDM and the network PC next to PETSc's classical solvers on a 64^3 obstacle scene
demo: env
	$(VENV)/bin/deepcd bench --scenes spheres --sizes 64 --seed 7 --repeats 1 --out demo_out

# the README's measured tables: DCDM, FCG+network and every baseline at 64^3 and 128^3 (~10 min on
# 2 cores), then a 64^3 row of each operator family next to GAMG, hypre and Jacobi (~2 min)
bench: env
	$(VENV)/bin/deepcd bench --scenes spheres,smoke,liquid --sizes 64,128 --repeats 2 --threads 2 --out bench_out
	$(VENV)/bin/deepcd bench --scenes density,perm,aniso,stretch,periodic --sizes 64 \
	    --solvers dcdm,cg+gamg,cg+hypre,cg+jacobi --seed 3 --repeats 2 --threads 1 --out bench_out/families

# issue 17: DCDM against default and tuned AMG/MG at one size N, 1 rank x 1 thread each:
# single solves, FAIR_SOLVES solves on one operator (set-up reused), and a new
# geometry every FAIR_EVERY solves (moving obstacles). README "Against the
# fastest classical solver" lists the 128^3 and 256^3 settings.
N ?= 64
FAIR_SCENES ?= spheres,smoke,liquid
FAIR_SOLVERS ?= dcdm,cg+icc,cg+gamg,cg+hypre,cg+mg,cg+gamg-tuned,cg+hypre-tuned,cg+mg-tuned
FAIR_REPEATS ?= 2
FAIR_SOLVES ?= 10
FAIR_EVERY ?= 5
FAIR = $(VENV)/bin/deepcd bench --scenes $(FAIR_SCENES) --sizes $(N) --solvers $(FAIR_SOLVERS) \
	--repeats $(FAIR_REPEATS) --threads 1
bench-fair: env
	$(FAIR) --out bench_out/fair/$(N)/single
	$(FAIR) --solves $(FAIR_SOLVES) --out bench_out/fair/$(N)/repeated
	$(FAIR) --solves $(FAIR_SOLVES) --change-every $(FAIR_EVERY) --out bench_out/fair/$(N)/moving

clean:
	rm -rf build *.egg-info .pytest_cache examples/c/poisson3d examples/c/*.o
