#!/usr/bin/env bash
# The two Quickstart commands. Sets itself up: a virtual environment in .venv with the pinned
# requirements (re-installed only when a requirements file changes), then
#   ./run.sh demo [run_all.py args...]   runs notebooks 00 -> 03 on the built-in demo data
#   ./run.sh test [pytest args...]       runs the test suite
#   ./run.sh lab                         opens JupyterLab in notebooks/
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  # papermill runs the notebooks in the kernel named python3: make it this environment's python
  .venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (.venv)" >/dev/null
  echo "$want" > "$stamp"
fi
cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) exec .venv/bin/python run_all.py "$@" ;;
  test) .venv/bin/ruff check . && exec .venv/bin/python -m pytest -q "$@" ;;
  lab)  exec .venv/bin/jupyter lab --notebook-dir=notebooks "$@" ;;
  *) echo "usage: ./run.sh demo|test|lab [args]" >&2; exit 2 ;;
esac
