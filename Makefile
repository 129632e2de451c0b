# Mailroom: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest
USERS ?= 10000
export PYTHONPATH := $(CURDIR)/src:$(CURDIR)/dags

.DEFAULT_GOAL := help
.PHONY: help venv demo airflow airflow-stop airflow-status test test-unit test-dag test-integration test-e2e test-distributed lint typecheck check lock lock-check translations dev-server clean bench bench-e2e bench-console bench-feedback

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
	$(BIN)/python -m pip install --quiet -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
	$(BIN)/python -m pip check
	@touch $@

venv: $(STAMP) ## Create .venv from the pinned lock (requirements.txt)

demo: $(STAMP) ## Run the example campaign end to end on SQLite (YES=1 approves without asking, USERS=N)
	$(BIN)/mailroom demo --users $(USERS) $(if $(YES),--yes) $(if $(SENDGRID_API_HOST),--sendgrid-api-host $(SENDGRID_API_HOST))

# The demo's local Airflow (.airflow/, its connections and variables) started again, detached,
# without triggering anything: after `make demo` ended, or after its processes were killed.
AIRFLOW_PORT ?= 28080
airflow: $(STAMP) ## Start the demo's local Airflow again, detached, triggering nothing (AIRFLOW_PORT=N)
	$(BIN)/mailroom local-airflow start --port $(AIRFLOW_PORT)

airflow-stop: $(STAMP) ## Stop the local Airflow and every process it started
	$(BIN)/mailroom local-airflow stop

airflow-status: $(STAMP) ## Which components of the local Airflow run
	$(BIN)/mailroom local-airflow status

test: $(STAMP) ## All test tiers: unit, DAG integrity, integration (dag.test), end-to-end (real Airflow)
	$(PYTEST) -m "unit or dag" -q
	$(PYTEST) -m integration -q
	$(PYTEST) -m e2e -q

test-unit: $(STAMP) ## Domain package only, no Airflow
	$(PYTEST) -m unit -q

test-dag: $(STAMP) ## DAG integrity: imports, no connections at parse time, policy
	$(PYTEST) -m dag -q

test-integration: $(STAMP) ## The whole DAG through dag.test() against the local SendGrid-compatible server
	$(PYTEST) -m integration -q

test-e2e: $(STAMP) ## Real Airflow processes and REST approval: the non-interactive demo path
	$(PYTEST) -m e2e -q

test-distributed: $(STAMP) ## CeleryExecutor on PostgreSQL + Redis, two workers, one killed mid-send (not in `make test`)
	$(PYTEST) -m distributed -q tests/distributed

lint: $(STAMP) ## ruff check and format check (never rewrites)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy on the packages, the DAG and the plugin
	$(BIN)/mypy

check: lint typecheck ## Lint and type checks

PIP_COMPILE := $(BIN)/pip-compile --quiet --no-header --strip-extras --no-emit-index-url --no-emit-find-links

lock: ## Recompile requirements.txt from requirements.in
	$(PIP_COMPILE) -o requirements.txt requirements.in

# pip-compile keeps the pins its output file already has: compiling onto a copy of the lock
# changes nothing while the lock satisfies requirements.in, whatever newer releases exist.
lock-check: $(STAMP) ## Fail with a diff unless requirements.txt is what requirements.in compiles to (never rewrites it)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cp requirements.txt "$$tmp/requirements.txt" && \
	$(PIP_COMPILE) -o "$$tmp/requirements.txt" requirements.in && \
	if ! diff -u --label requirements.txt --label "compiled from requirements.in" \
		requirements.txt "$$tmp/requirements.txt"; then \
		echo "requirements.txt does not match requirements.in: run \`make lock\` and commit both" >&2; \
		exit 1; \
	fi && echo "lock-check: requirements.txt is what requirements.in compiles to"

translations: $(STAMP) ## Re-extract messages and update every locale's catalog
	$(BIN)/pybabel extract -F babel.cfg --ignore-dirs='.* __pycache__ var .venv .airflow' -c TRANSLATORS: \
		--no-location --sort-output --project=Mailroom -o include/translations/messages.pot .
	$(BIN)/pybabel update -i include/translations/messages.pot -d include/translations -D messages \
		--no-fuzzy-matching --ignore-obsolete

dev-server: $(STAMP) ## Start the SendGrid-compatible dev server on :3030 (records to var/sendgrid-dev)
	$(BIN)/mailroom-sendgrid-dev --port 3030 --data-dir var/sendgrid-dev

# In-process sizes: 100,000 by default; FULL=1 adds 1,000,000 and the end-to-end runs through
# Airflow; HUGE=1 adds 10,000,000 in process. BENCH_USERS="N ..." picks the sizes outright.
BENCH_USERS ?= 100000 $(if $(or $(FULL),$(HUGE)),1000000) $(if $(HUGE),10000000)
E2E_USERS ?= 100000 $(if $(FULL),1000000)
E2E_DB ?= sqlite postgres

bench: $(STAMP) ## Benchmarks: stages and baselines on 100,000 users -> BENCHMARKS.md (FULL=1: + 1M and Airflow end to end; HUGE=1: + 10M)
	$(BIN)/python bench/run.py --users $(BENCH_USERS) $(if $(FULL),--e2e $(E2E_USERS) --e2e-db $(E2E_DB))

bench-e2e: $(STAMP) ## Benchmarks: trigger to report through Airflow on SQLite and PostgreSQL (E2E_USERS="N ...", E2E_DB=sqlite) -> BENCHMARKS.md
	$(BIN)/python bench/e2e_airflow.py --users $(E2E_USERS) --db $(E2E_DB)

CONSOLE_USERS ?= 100000 1000000
bench-console: $(STAMP) ## Benchmarks: the campaign console's run view mid-send, SQLite and PostgreSQL (CONSOLE_USERS="N ...") -> BENCHMARKS.md
	$(BIN)/python bench/run.py --stage console --users $(CONSOLE_USERS)

FEEDBACK_RECIPIENTS ?= 200000
bench-feedback: $(STAMP) ## Benchmarks: SendGrid's Event Webhook into the outbox through `mailroom feedback serve`, SQLite and PostgreSQL (FEEDBACK_RECIPIENTS=N) -> BENCHMARKS.md
	$(BIN)/python bench/run.py --stage feedback --users $(FEEDBACK_RECIPIENTS)

clean: ## Remove the virtualenv, the demo's Airflow home and staging
	rm -rf $(VENV) .airflow var
