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

.PHONY: reproduce test quick benchmark audit relock
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
