# Two entry points, each sets itself up on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint wheel-test bench evaluate clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo --output-dir demo-output

test: $(STAMP)
	$(PY) -m pytest -q

# CI: ruff (settings in pyproject.toml), and the wheel, installed without the checkout, runs `attention-map run --model demo` (seconds).
lint: $(STAMP)
	$(PY) -m ruff check .

wheel-test: $(STAMP)
	.ci/wheel_test.sh $(PY)

# Not part of the two commands: regenerate docs/BENCHMARKS.md (tens of minutes on 2 cores), and evaluate
# the shipped demo model (minutes each): its card's crop metrics re-measured (tools.evaluate_demo_model prints them;
# with --checkpoint ... --ship it writes a new card, whole scans included) and docs/EVALUATION.md (benchmarks.evaluate,
# which also runs the whole scans, so the first command skips them: each whole scan runs once).
bench: $(STAMP)
	nice -n 5 $(PY) -m benchmarks.run_benchmarks

evaluate: $(STAMP)
	nice -n 5 $(PY) -m tools.evaluate_demo_model --no-whole-scans
	nice -n 5 $(PY) -m benchmarks.evaluate

clean:
	rm -rf $(VENV)
