# Two commands do all set-up from a fresh clone: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.agentkd-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-fast lint bench quality mutants clean

# torch first, from the CPU wheel on disk: letting pip resolve it through peft pulls a CUDA build of
# several GB (ENVIRONMENT.md).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/agentkd run examples/quickstart.toml

# pytest exits 5 when it collected no test: that must fail, not pass silently.
test: setup
	@$(VENV)/bin/pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check agentkd tests benchmarks

# Each prints what it measured, with its baseline, and a JSON object as its last line.
# The distillation quality lab (~30 min on 2 cores) is apart: `make quality`.
bench: setup
	$(PY) benchmarks/store_write.py
	$(PY) benchmarks/dedup.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/gateway_overhead.py
	$(PY) benchmarks/gateway_ceiling.py

# Do the methods beat plain imitation at equal teacher cost? Rewrites benchmarks/quality.{md,json,png}.
quality: setup
	$(PY) benchmarks/distill_quality.py

# Mutation testing of the money and data path (mutmut; about an hour on 2 cores, so not in CI). Rewrites
# benchmarks/mutation.{md,json}; fails when the score is under 0.9 or a survivor is unexplained.
mutants: setup
	nice -n 15 $(PY) benchmarks/mutation.py

clean:
	rm -rf runs/quickstart .pytest_cache mutants
