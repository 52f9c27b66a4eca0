# Baton — `make run` starts the engine with the embedded default, `make test` runs the suite.
# Both set everything up first; `make setup` is idempotent.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
DEB_PACKAGES := sip-tester espeak-ng sox baresip kamailio iproute2 procps gcc make python3-venv tshark openssl nftables
TOOLS := sipp espeak-ng sox baresip kamailio ip pgrep gcc tshark openssl nft
PYTHON ?= python3
DATA ?= .baton

.PHONY: setup deb venv build debug run test test-fast bench clean

setup: deb venv build

deb:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEB_PACKAGES); \
	fi

.venv/.stamp: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PIP) install -q -U pip setuptools wheel
	$(PIP) install -q "Cython>=3.0.10,<3.2" "numpy>=1.26"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

venv: .venv/.stamp

build: venv
	$(PY) setup.py -q build_ext --inplace -j 2
	@if ls proto/baton/v1/*.proto >/dev/null 2>&1; then \
	  mkdir -p proto/_gen && \
	  $(PY) -m grpc_tools.protoc -Iproto --python_out=proto/_gen --grpc_python_out=proto/_gen \
	    --pyi_out=proto/_gen proto/baton/v1/*.proto; fi

debug: venv
	BATON_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force -j 2

run: setup
	.venv/bin/baton serve --config examples/demo.toml --data-dir $(DATA)

test: setup
	.venv/bin/python -m pytest -q -p no:randomly --durations=25 tests
	BATON_NO_EXTENSIONS=1 .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 \
	  -m "not interop and not netns and not kernels_only" tests

bench: setup
	$(PY) bench/sip_cps.py

clean:
	rm -rf build ext/*.c ext/*.so ext/*.html
