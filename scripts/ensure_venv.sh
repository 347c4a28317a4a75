# Sourced by run_local.sh and run_tests.sh: creates or reuses .venv with the project installed.
# Reinstalls only when setup.py, pyproject.toml or requirements.txt changed since the last install.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating virtual environment $VENV (first run only; about two minutes)..." >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat setup.py pyproject.toml requirements.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log="$VENV/install.log"
  { "$VENV/bin/python" -m pip install --upgrade pip && "$VENV/bin/python" -m pip install -e '.[test,search,publish]'; } >"$log" 2>&1 \
    || { cat "$log" >&2; echo "Installing the project into $VENV failed; the log is above." >&2; exit 1; }
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
