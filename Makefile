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

# the README's measured tables (~12 min on 2 cores)
bench: env
	$(VENV)/bin/deepcd bench --scenes box,smoke,spheres,liquid --sizes 64,128 --solvers cg,cg+jacobi,cg+icc,cg+gamg,cg+hypre,cg+mg --repeats 2 --threads 2 --out bench_out/baselines
	$(VENV)/bin/deepcd bench --scenes spheres,smoke,liquid --sizes 64 --repeats 2 --threads 2 --out bench_out/dcdm64

clean:
	rm -rf build *.egg-info .pytest_cache examples/c/poisson3d examples/c/*.o
