# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-quick bench-scale lint format clean

# torch and torchvision are installed first at the release this project is tested
# with (on this project's machines pip takes them from local disk, CPU or CUDA).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo.run_demo

# The suite in TEST_WORKERS processes (pytest-xdist; 0: in this one), each test file whole in
# one of them so that its module fixtures are built once. On 2 cores the suite waits on its
# servers, workers and CLI subprocesses about as long as it computes: 16.5 min in one
# process, 10.3 in two, measured; three processes took 12:01 where two took 13:24 (same
# checkout, one after the other, 7 December). Each starts its own PostgreSQL and Redis.
# --no-loadscope-reorder: files are sent in collection order (tests/conftest.py's
# LONGEST_FIRST, the longest first), not xdist's default of the most tests first, which
# left a long file of few tests to run alone at the end.
# pytest exits 5 when it collected no test: that is a failure, not a pass.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

# Benchmarks print ratios measured side by side; exit 1 means a target was missed.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --quick

# The scale benchmark alone (issue 24): 100,000 against 1,000,000 records.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --only scale

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo-output enrichment.sqlite3 .pytest_cache .ruff_cache
