# The README's two commands: `make demo` and `make test`. Both work from a fresh
# clone: the first run creates .venv and installs tickpipe with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint browser promtool wrk down clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tickpipe needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

## demo: start the local stack, run ingest + two flushers + a feeder, check Postgres
demo: $(STAMP)
	$(BIN)/tickpipe demo

## test: lint, type-check and run the whole test suite (real Redis and Postgres, headless Chromium)
test: lint browser promtool wrk
	$(BIN)/pytest

# A Debian package a test needs: $(call apt_install,PRESENT,PACKAGE,WHO NEEDS IT,OR ELSE).
# As root with apt, install it; otherwise say how, and those tests fail.
define apt_install
	@if $(1); then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's $(2) for $(3)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	else \
		echo "tickpipe: $(3) need $(2): run 'sudo apt-get install $(2)'$(4); they fail without it" >&2; \
	fi
endef

# The live chart's tests drive a real headless Chromium (tests/ingest/test_chart.py).
browser:
	$(call apt_install,[ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1,chromium,the browser tests, (or set CHROMIUM=/path/to/chromium))

# The alert rules' test runs `promtool check rules` (tests/test_observability.py).
# As root with apt, take promtool from Debian's prometheus package (the binary only:
# no Prometheus service is installed or started); otherwise say how, and that test fails.
promtool:
	@if command -v promtool >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing promtool from Debian's prometheus package for the alert rules' test"; \
		dir=$$(mktemp -d) && apt-get update -qq && (cd $$dir && apt-get download -qq prometheus 2>/dev/null) \
			&& dpkg-deb --fsys-tarfile $$dir/prometheus_*.deb | tar -xO ./usr/bin/promtool > /usr/local/bin/promtool \
			&& chmod 755 /usr/local/bin/promtool; rm -rf $$dir; \
	else \
		echo "tickpipe: the alert rules' test needs promtool: run 'sudo apt-get install prometheus' (or put promtool on PATH); it fails without it" >&2; \
	fi

# `tickpipe bench --read` drives its GETs with wrk (tests/test_bench.py runs it).
wrk:
	$(call apt_install,command -v wrk >/dev/null 2>&1,wrk,the read bench's tests,)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## down: stop the local stack the demo left running
down: $(STAMP)
	$(BIN)/tickpipe down

clean: down
	rm -rf .tickpipe
