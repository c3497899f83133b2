# baileys.resilience: every entry point an operator or CI needs.
#   make test       install what is missing, lint, run every test (pytest + molecule)
#   make demo       the main job end to end on a throwaway local PostgreSQL under .demo/
#   make bench      benchmarks (prints ratios against baselines measured in the same run)
#   make molecule [S=<scenario>]   molecule scenarios only
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
COLL_LINK := .build/collections/ansible_collections/baileys/resilience
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.build/collections
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PATH := $(VENV)/bin:$(PATH)
S ?=

.PHONY: test deps venv system-deps npm-deps collection lint pytest unit integration compat molecule \
        molecule-prepare demo bench build clean

test: deps lint pytest molecule

deps: system-deps venv collection npm-deps

system-deps:
	bash scripts/install-system-deps.sh

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

collection: $(COLL_LINK)
$(COLL_LINK):
	mkdir -p $(dir $(COLL_LINK))
	ln -sfn $(CURDIR) $(COLL_LINK)

npm-deps: tests/compat/node_modules/.installed tests/standin/node_modules/.installed
tests/compat/node_modules/.installed: tests/compat/package.json tests/compat/package-lock.json
	cd tests/compat && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@
tests/standin/node_modules/.installed: tests/standin/package.json tests/standin/package-lock.json
	cd tests/standin && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

lint: venv collection
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ansible-lint --offline

pytest: deps
	$(PY) -m pytest tests/unit tests/integration

unit: venv collection
	$(PY) -m pytest tests/unit

integration: deps
	$(PY) -m pytest tests/integration

molecule: deps
	bash scripts/molecule.sh $(S)

molecule-prepare: deps
	bash scripts/molecule-prepare.sh

demo: deps
	bash scripts/demo.sh

bench: deps
	$(PY) benchmarks/run.py
	$(PY) benchmarks/bench_s3.py

build: collection
	mkdir -p .build/dist
	$(VENV)/bin/ansible-galaxy collection build --force --output-path .build/dist

clean:
	rm -rf .build .demo .pytest_cache .ruff_cache benchmarks/.data
