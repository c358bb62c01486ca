# Three commands on a fresh machine (README):
#   make reproduce   create .venv from requirements.txt, then `dvc repro` (the full reproduction)
#   make test        create .venv from requirements.txt, then the test suite
#   make audit       re-check the committed results on the CPU, without retraining
# Also: make quick (a short profile as a DVC experiment), make benchmark, make relock (re-lock a
# refactor whose outputs are shown not to move; README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

$(BIN)/dvc: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

.PHONY: reproduce test quick benchmark audit relock mutation
reproduce: $(BIN)/dvc
	PATH=$(abspath $(BIN)):$$PATH dvc repro

test: $(BIN)/dvc
	PATH=$(abspath $(BIN)):$$PATH python -m pytest

quick: $(BIN)/dvc
	PATH=$(abspath $(BIN)):$$PATH python scripts/profile.py quick --run

benchmark: $(BIN)/dvc
	$(BIN)/python benchmarks/step_times.py

# Re-check the committed results on the CPU without retraining (README, "Auditing the results").
audit: $(BIN)/dvc
	$(BIN)/python scripts/audit.py

# Re-lock stages whose only change is code, once their outputs are shown not to move (README,
# "Refactoring without recomputing"). `make relock ARGS=--dry-run` checks without committing.
relock: $(BIN)/dvc
	PATH=$(abspath $(BIN)):$$PATH python scripts/relock.py $(ARGS)

# Mutation testing (reports/mutation.md): mutants of the bounds, attacks and audit comparisons run
# against the fast unit tests (setup.cfg). About 25-30 min cold on 2 cores; mutants/ is git-ignored; not in CI.
MUTANTS ?= 'provae.interval.*' 'provae.bounds.*' 'provae.attacks.*' 'provae.linear_bounds.*' 'provae.certificate_audit.*' \
	'scripts.audit.xǁProjectǁ__init__*' 'scripts.audit.xǁProjectǁlocked*' 'scripts.audit.xǁProjectǁpath_of*' \
	'scripts.audit.x_inside*' 'scripts.audit.x_locked_outputs*' 'scripts.audit.x_output_problem*' \
	'scripts.audit.x_check_outputs*' 'scripts.audit.x_non_finite*' 'scripts.audit.x_scan_files*' 'scripts.audit.x_finite_verdict*' 'scripts.audit.x_model_files*' 'scripts.audit.x_scan_per_example*' \
	'scripts.audit.x_scan_table*' 'scripts.audit.x_check_finite*' 'scripts.audit.x_images_at*' \
	'scripts.audit.x_relative_difference*' 'scripts.audit.x_certificate_violations*'
mutation: $(BIN)/dvc
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/python scripts/mutation_report.py $(MUTANTS)
