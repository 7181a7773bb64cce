# Two entry points, each sets itself up on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-evaluation test-cohort lint wheel-test gui-pythons index-check monai-series bench evaluate clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "$(PYTHON) is older than Python 3.11, which requirements.lock needs (numpy 2.4.6): set PYTHON=python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo --output-dir demo-output

test: $(STAMP)
	$(PY) -m pytest -q

# CI: the tests marked `evaluation` (the shipped model over whole scans with inserted lesions, and over scans of other
# body regions and modalities with no region; 6-10 min), left out of `make test` by pyproject.toml's addopts
test-evaluation: $(STAMP)
	$(PY) -m pytest -q -m evaluation

# CI: the cohort tests with separate processes: a `dask scheduler` and `dask worker` pair on loopback, one worker
# killed mid-cohort, a cohort interrupted by Ctrl-C and resumed (about 1.5 min)
test-cohort: $(STAMP)
	$(PY) -m pytest -q -m cohort Testing/test_cohort.py

# CI: ruff (settings in pyproject.toml), and the wheel, installed without the checkout, runs `attention-map run --model demo` (seconds).
lint: $(STAMP)
	$(PY) -m ruff check .

wheel-test: $(STAMP)
	.ci/wheel_test.sh $(PY)

# CI: the GUI side of the worker (the Slicer module's client, protocol, dependency plan) on the Pythons Slicer ships,
# 3.9 (Slicer 5.8, numpy 1.26.4) and 3.12 (Slicer 5.10 / 5.12, numpy 2.4.6), each with only numpy and pytest, the
# worker in this project's Python (torch, MONAI) through ATTENTIONMAP_WORKER_PYTHON: the external-worker case.
# The interpreters come from pyenv (PY39 / PY312 override them). About 1.5 min.
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
PY39  ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.9.*/bin/python3.9))
PY312 ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12.*/bin/python3.12))
GUI_TESTS := Testing/test_worker_gui_side.py Testing/test_dependencies.py

gui-pythons: $(STAMP)
	@test -n "$(PY39)" -a -n "$(PY312)" || { echo "gui-pythons: Python 3.9 and 3.12 not found (set PY39 / PY312)"; exit 2; }
	$(PY39) -m venv .venv-gui-3.9
	.venv-gui-3.9/bin/python -m pip install --quiet numpy==1.26.4 pytest==8.3.5
	ATTENTIONMAP_WORKER_PYTHON=$(abspath $(PY)) .venv-gui-3.9/bin/python -m pytest -q --noconftest -p no:cacheprovider $(GUI_TESTS)
	$(PY312) -m venv .venv-gui-3.12
	.venv-gui-3.12/bin/python -m pip install --quiet numpy==2.4.6 pytest==9.2.0
	ATTENTIONMAP_WORKER_PYTHON=$(abspath $(PY)) .venv-gui-3.12/bin/python -m pytest -q --noconftest -p no:cacheprovider $(GUI_TESTS)

# CI: the capture, engine, model and worker tests on what the plans install besides the main suite's MONAI 1.6.1 +
# numpy 2.4.6 (Slicer 5.12): Slicer 5.8's plan (dependencies.SERIES[1]: MONAI 1.5.2, nibabel 5.3.3, safetensors
# 0.7.0) with its numpy 1.26.4, and Slicer 5.10's (MONAI 1.6.1) with its numpy 2.0.2. torch is the pinned CPU build
# (the plans' torch has no CPU wheel on the package index for Linux). About 8 min.
ENGINE_TESTS := Testing/test_engine_reference.py Testing/test_engine_oracle_and_errors.py Testing/test_blockwise.py \
	Testing/test_discard_cache.py Testing/test_volume.py Testing/test_volume_flips.py Testing/test_volume_shifts.py \
	Testing/test_preprocess.py Testing/test_models.py Testing/test_mrml_worker.py Testing/test_worker_gui_side.py \
	Testing/test_domain.py Testing/test_swin.py Testing/test_segment.py Testing/test_declared.py
SERIES_COMMON := torch==2.13.0 einops==0.8.2 simpleitk==2.5.7 pyyaml==6.0.4 tqdm==4.70.1 matplotlib==3.11.2 pytest==9.2.0

monai-series: $(STAMP)
	@set -e; for plan in "slicer-5.8:monai==1.5.2 numpy==1.26.4 nibabel==5.3.3 safetensors==0.7.0" \
	                     "slicer-5.10:monai==1.6.1 numpy==2.0.2 nibabel==5.4.2 safetensors==0.8.0"; do \
		name=$${plan%%:*}; pins=$${plan#*:}; echo "== $$name: $$pins"; \
		$(PYTHON) -m venv .venv-$$name; \
		.venv-$$name/bin/python -m pip install --quiet $(SERIES_COMMON) $$pins; \
		.venv-$$name/bin/python -m pytest -q -p no:cacheprovider $(ENGINE_TESTS) \
			-k "not segment_statistics and not gui_side_statistics"; \
	done  # the two tests left out need slicer-core (the main suite's)

# CI: every Slicer release x system's dependency plan resolves on the package index or is refused up front (~20 s).
index-check: $(STAMP)
	$(PY) .ci/index_check.py

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
