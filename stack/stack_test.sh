#!/usr/bin/env bash
# `make stack-test`: the team stack of docker-compose.yml run as local processes (no Docker
# engine needed) and checked end to end by `python -m stack.native`, which prints one line
# per check and a PASS/FAIL summary. Installs what it needs when missing: PostgreSQL from
# Debian's packages, and MLflow's auth extra and the psycopg Postgres driver into the
# project's virtual environment. Bounded in time (STACK_TEST_TIMEOUT, default 570 s);
# everything it started is stopped and its temporary directory (logs of every service)
# removed on exit, unless STACK_TEST_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT=${STACK_TEST_TIMEOUT:-570}

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
  echo "stack-test: installing PostgreSQL from Debian's packages"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
if ! "$PY" -c "import psycopg, flask_wtf" 2>/dev/null; then
  echo "stack-test: installing mlflow[auth] and psycopg into $PY's environment"
  "$PY" -m pip install --quiet -c constraints.txt "mlflow[auth]" "psycopg[binary]"
fi

state=$(mktemp -d "${TMPDIR:-/tmp}/tinyseek-stack.XXXXXX")
cleanup() {
  local status=$?
  if [ "$status" -eq 124 ] || [ "$status" -ge 128 ]; then
    echo "stack-test: FAIL (the runner was stopped: exit $status)"
  fi
  if [ -s "$state/pgids" ]; then  # left behind only if the runner itself was killed
    while read -r pgid; do kill -TERM -- "-$pgid" 2>/dev/null || true; done <"$state/pgids"
    sleep 3
    while read -r pgid; do kill -KILL -- "-$pgid" 2>/dev/null || true; done <"$state/pgids"
  fi
  if [ -n "${STACK_TEST_KEEP:-}" ]; then
    echo "stack-test: logs and data kept in $state"
  else
    rm -rf "$state"
  fi
  exit "$status"
}
trap cleanup EXIT

timeout --kill-after=30 "$LIMIT" "$PY" -m stack.native --state-dir "$state" --timeout "$((LIMIT - 40))"
