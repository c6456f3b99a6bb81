#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis the tests use answer; start them when installed but stopped.
set -euo pipefail
PGHOST=${TENFOLD_TEST_PGHOST:-127.0.0.1}
PGPORT=${TENFOLD_TEST_PGPORT:-5432}
REDIS_PORT=${TENFOLD_TEST_REDIS_PORT:-6379}

wait_for() { # name, check command...
  local name=$1; shift
  for _ in $(seq 1 50); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "backends: $name did not come up" >&2; return 1
}

if ! pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "backends: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    wait_for PostgreSQL pg_isready -q -h "$PGHOST" -p "$PGPORT"
  else
    echo "backends: PostgreSQL is not reachable at $PGHOST:$PGPORT and not installed here" >&2
  fi
fi

if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "backends: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
    wait_for Redis sh -c "redis-cli -p $REDIS_PORT ping | grep -q PONG"
  else
    echo "backends: Redis is not reachable on port $REDIS_PORT and not installed here" >&2
  fi
fi
