# make demo | make test | make bench -- each creates .venv first when missing
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env test demo bench clean

env:
	@VENV=$(VENV) sh tools/bootstrap.sh

test: env
	$(PY) -m pytest -q tests

# DCDM and the network PC next to PETSc's classical solvers on a 64^3 obstacle scene
demo: env
	$(VENV)/bin/deepcd bench --scenes spheres --sizes 64 --seed 7 --repeats 1 --out demo_out

# the README's measured table: DCDM, FCG+network and every baseline at 64^3 and 128^3 (~10 min on 2 cores)
bench: env
	$(VENV)/bin/deepcd bench --scenes spheres,smoke,liquid --sizes 64,128 --repeats 2 --threads 2 --out bench_out

clean:
	rm -rf build *.egg-info .pytest_cache examples/c/poisson3d examples/c/*.o
