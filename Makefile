# Two commands do everything: `make repro` (the pipeline) and `make test` (the test suite).
# Both install the locked environment first (uv.lock), into .venv, with uv bootstrapped into .tools.
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
RUN := $(UV) run --frozen

.PHONY: install repro queue rate lint format test test-fast params builtins clean-env

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv==$(UV_VERSION)

# --compile-bytecode: the packages' .pyc written once here, not by the first run of each module - and never where
# PYTHONDONTWRITEBYTECODE is set, which would leave every process compiling torch and diffusers again (~2.6x the
# ~6 CPU-s of importing diffusers, paid by each stage a test starts).
.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --compile-bytecode
	touch $@

install: .venv/.synced

repro: install
	$(RUN) dvc repro

# Run the experiments queued with `dvc exp run --queue` until none is left (lanskap/sweep/run_queue.py): DVC starts
# its workers as the `dvc` on PATH, and a worker can stop with experiments still queued.
queue: install
	$(RUN) python -m lanskap.sweep.run_queue $(QUEUE_ARGS)

# The blind side-by-side rating page for the generated images, on http://127.0.0.1:8765/ (lanskap/rate); Ctrl-C,
# then commit ratings/votes.sqlite and `dvc repro qualitative` for the win rates.
rate: install
	$(RUN) python -m lanskap.rate $(RATE_ARGS)

# Ruff (pyproject.toml [tool.ruff]): the lint rules, and the formatting as checked, not applied.
lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: install
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

# Every test, the slow end-to-end ones included, over 2 worker processes (pytest-xdist), each test file on one
# worker so that a module's shared pipeline run happens once, the longest files first (tests/conftest.py
# LONGEST_FIRST; --no-loadscope-reorder keeps that order); the 25 slowest are listed.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test: lint
	$(RUN) pytest $(XDIST) --durations=25 $(PYTEST_ARGS)

# The edit loop: the same suite without the tests marked slow.
test-fast: install
	$(RUN) pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# Retrain the built-in models into lanskap/assets/builtin/ (about an hour on 2 CPU cores): the base model in one
# process, the CLIP and Inception stand-ins in another, one torch thread each.
builtins: install
	$(RUN) python -m lanskap.builtin tiny-sd2 & base=$$!; \
	$(RUN) python -m lanskap.builtin tiny-clip tiny-inception; stand_ins=$$?; \
	wait $$base && exit $$stand_ins

# Recompose params.yaml from conf/, e.g. `make params OVERRIDES="preset=paper"`.
params: install
	$(RUN) python -m lanskap.core.presets $(OVERRIDES)

clean-env:
	rm -rf .venv .tools
