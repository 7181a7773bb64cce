#!/usr/bin/env bash
# Wheel test: build the wheel from the checkout, install it (--no-deps) into a fresh venv that sees the pinned
# third-party packages of the build venv but not the checkout, and from a folder outside the checkout run
# `attention-map run --model demo` on a small synthetic chest CT (.ci/wheel_check.py checks the outputs).
# Usage: .ci/wheel_test.sh [PYTHON]   (PYTHON: the venv holding requirements.lock; default .venv/bin/python)
set -euo pipefail
unset PYTHONPATH  # the checkout must not be importable in the wheel's venv
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SECONDS=0

# Build from a copy of the tracked and unignored files, so that no earlier build/ folder leaks into the wheel.
mkdir "$WORK/src"
git -C "$REPO" ls-files -z --cached --others --exclude-standard | (cd "$REPO" && xargs -0 tar -cf - --ignore-failed-read) |
  tar -xf - -C "$WORK/src"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/attentionmap-*.whl)"

# A venv without pip; its one .pth line puts the build venv's site-packages (the pinned dependencies) after its
# own. A plain path line: the .pth files in that folder (the build venv's editable install of the checkout) are
# not read, so AttentionMapLib can only come from the wheel.
"$PY" -m venv --without-pip "$WORK/venv"
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
purelib "$PY" > "$(purelib "$WORK/venv/bin/python")/pinned_dependencies.pth"
"$PY" -m pip --python "$WORK/venv/bin/python" install --quiet --no-deps --no-index "$WHEEL"

cd "$WORK"
"$WORK/venv/bin/python" -I "$REPO/.ci/wheel_check.py" "$WORK/venv/bin/attention-map" "$REPO"
echo "wheel test passed: $(basename "$WHEEL") in ${SECONDS} s"
