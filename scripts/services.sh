#!/usr/bin/env bash
# Makes sure the real services the test suite talks to are up (PostgreSQL, Redis), starting them with the
# commands this machine kind documents when they are down, and that Chromium is installed for the console's
# browser tests. Fails loudly when one cannot be started or installed.
set -euo pipefail
cmd=${1:-ensure}
[ "$cmd" = ensure ] || { echo "usage: $0 ensure" >&2; exit 2; }

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up || { echo "services: FATAL: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

if ! redis_up; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 1 30); do redis_up && break; sleep 1; done
fi
redis_up || { echo "services: FATAL: Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
echo "services: PostgreSQL and Redis are up"

# The web console's browser tests (tests/console) drive Debian's Chromium through Playwright; Playwright's own
# browser download (`playwright install`) is never used. Missing, it is installed from the distribution.
CHROMIUM=/usr/bin/chromium
if [ ! -x "$CHROMIUM" ]; then
  echo "services: installing Chromium (apt-get install -y chromium)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; } || true
fi
[ -x "$CHROMIUM" ] || { echo "services: FATAL: $CHROMIUM is missing and could not be installed" >&2; exit 1; }
echo "services: Chromium is at $CHROMIUM"
