# cliplung: set-up, tests and the demo. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip resolves torch first on its own: resolving it together with s3fs/aiobotocore/boto3 makes pip
# backtrack through every torch release. Override for another platform, e.g.
#   make setup TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast test-readme lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# DeepSpeed JIT-compiles an op at the first CPU run (about 25 s): build it here, once.
	$(BIN)/python -c "from cliplung.train.step import prebuild_deepspeed_ops as b; print(b())"
	touch $@

# Debian packages the tests use: a real Prometheus server (and its promtool) for the metrics and
# dashboard tests, shellcheck for cluster/local-cluster.sh, PostgreSQL (initdb, pg_ctl) for the
# study-database tests. Needs root and apt.
SYSTEM_DEPS := prometheus:prometheus promtool:prometheus shellcheck:shellcheck
system-deps:
	@missing=$$(for dep in $(SYSTEM_DEPS); do command -v $${dep%%:*} >/dev/null 2>&1 || echo $${dep#*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: cannot apt-get $$missing; the tests that need them are skipped"; fi; fi
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "note: postgresql not installed and cannot apt-get it; its tests will be skipped"; fi; }

demo: setup
	$(BIN)/cliplung quickstart

test: setup system-deps
	$(BIN)/python -m pytest -m "not readme" $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not readme" $(PYTEST_ARGS)

# The README as a test: every command block it shows, run as printed in a scratch copy.
test-readme: setup system-deps
	$(BIN)/python -m pytest -m readme tests/test_readme.py $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint k8s/Dockerfile

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
