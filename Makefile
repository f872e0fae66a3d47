# make demo | make test | make bench -- each creates .venv first when missing
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
MPIEXEC := mpiexec $(if $(filter 0,$(shell id -u)),--allow-run-as-root,) --oversubscribe

.PHONY: env test demo bench clean

env:
	@VENV=$(VENV) sh tools/bootstrap.sh

test: env
	$(PY) -m pytest -q tests

demo: env
	$(PY) examples/baselines.py --scene spheres --n 64 --seed 7

clean:
	rm -rf build *.egg-info .pytest_cache examples/c/poisson3d examples/c/*.o
