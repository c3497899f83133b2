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

.PHONY: test deps venv system-deps npm-deps collection lint pytest pytest-psycopg2 unit integration compat molecule \
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

lint: venv collection sanity
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ansible-lint --offline

# ansible-test sanity, locally (no containers), on the venv's Python. ansible-test keeps each tool (pylint,
# pycodestyle, yamllint, validate-modules...) in its own venv under ~/.ansible/test/venv, at the versions the
# pinned ansible-core ships; it builds them from PyPI on the first run (bootstrapping pip with
# tests/sanity/get_pip.py, as its own get-pip download host is out of reach) and runs offline from then on.
# It tests the git-tracked files (and untracked ones not in .gitignore); exceptions: tests/sanity/ignore-*.txt.
.PHONY: sanity
SANITY_PY = $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
SANITY_GET_PIP = $(HOME)/.ansible/test/cache/get_pip_$(shell $(PY) -c 'import types; \
	from ansible_test._internal.python_requirements import get_venv_packages as g; \
	print(g(types.SimpleNamespace(version="$(SANITY_PY)")).get("pip", "").replace(".", "_"))').py
sanity: venv collection
	test -s $(SANITY_GET_PIP) || install -D -m 0644 tests/sanity/get_pip.py $(SANITY_GET_PIP)
	cd $(COLL_LINK) && ANSIBLE_TEST_CONTENT_ROOT=$(CURDIR)/$(COLL_LINK) \
	  $(VENV)/bin/ansible-test sanity --python $(SANITY_PY) --color no

# The core's integration tests (export, import, backup, cleanup, health and the driver seam) run a second
# time under psycopg2 (pgdriver.py picks the driver from BAILEYS_RESILIENCE_PG_DRIVER): the design's driver.
PSYCOPG2_TESTS := $(addprefix tests/integration/plugins/module_utils/,test_pgdriver.py test_authstate.py \
  test_authguards.py test_authsource.py test_backup.py test_cleanup.py test_health.py)
pytest: deps
	$(PY) -m pytest --durations=15 tests/unit tests/integration
	BAILEYS_RESILIENCE_PG_DRIVER=psycopg2 $(PY) -m pytest $(PSYCOPG2_TESTS)

pytest-psycopg2: deps
	BAILEYS_RESILIENCE_PG_DRIVER=psycopg2 $(PY) -m pytest $(PSYCOPG2_TESTS)

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
	BAILEYS_RESILIENCE_PG_DRIVER=psycopg2 $(PY) benchmarks/run.py
	$(PY) benchmarks/bench_s3.py

build: collection
	mkdir -p .build/dist
	$(VENV)/bin/ansible-galaxy collection build --force --output-path .build/dist

clean:
	rm -rf .build .demo .pytest_cache .ruff_cache benchmarks/.data
