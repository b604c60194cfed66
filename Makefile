# Two commands do everything: `make repro` (the pipeline) and `make test` (the test suite).
# Both install the locked environment first (uv.lock), into .venv, with uv bootstrapped into .tools.
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
RUN := $(UV) run --frozen

.PHONY: install repro test params clean-env

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv==$(UV_VERSION)

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen
	touch $@

install: .venv/.synced

repro: install
	$(RUN) dvc repro

test: install
	$(RUN) pytest $(PYTEST_ARGS)

# Recompose params.yaml from conf/, e.g. `make params OVERRIDES="preset=paper"`.
params: install
	$(RUN) python -m lanskap.presets $(OVERRIDES)

clean-env:
	rm -rf .venv .tools
