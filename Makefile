# The README's two commands: `make run` and `make test`. Both create or reuse .venv/.
PY := .venv/bin/python

.PHONY: setup run test test-fast lint slurm-test

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

run: setup
	$(PY) run.py

# Everything but the Slurm tests (those need the local cluster: see `make slurm-test`).
test: setup
	$(PY) -m pytest -m "not slurm" -q

test-fast: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

slurm-test: setup
	bash scripts/slurm/start_local_slurm.sh
	$(PY) -m pytest -m slurm -q; rc=$$?; bash scripts/slurm/stop_local_slurm.sh; exit $$rc
