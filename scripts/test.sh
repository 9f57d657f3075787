#!/usr/bin/env bash
# Run the test suite in the project virtualenv; extra arguments go to pytest (e.g. tests/unit, -k promote).
# pytest's exit 5 ("no tests collected") counts as a pass only for a selection given as arguments (a -k or a
# path that matches nothing); the full suite collecting nothing is a failure, as is every other non-zero exit.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -ra --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ] && [ "$#" -gt 0 ]; then echo "[test] the selection '$*' matched no tests (exit 5): not a failure"; rc=0; fi
exit "$rc"
