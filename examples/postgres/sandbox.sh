#!/usr/bin/env bash
# A PostgreSQL primary and a streaming replica on free loopback ports, in one directory, for
# trying the examples (and for their tests): cluster `main` (its `cluster_name`, which the
# runbooks check their `cluster` param against). Run as root (the servers run as `postgres`) or as
# the user who will own the servers.
#
#   sandbox.sh up DIR      create DIR/primary and DIR/replica, start both; write DIR/env
#   sandbox.sh break DIR   stop the replica hard and delete its data directory
#   sandbox.sh status DIR  each member's role
#   sandbox.sh down DIR    stop both and delete DIR
#
# DIR/env holds PRIMARY_PORT, REPLICA_PORT, PRIMARY_DATA, REPLICA_DATA, for `. DIR/env`.
set -euo pipefail
cd "$(dirname "$0")"
. ./lib.sh

usage() { sed -n '2,11p' "$0" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() { # DATA
  as_pg pg_ctl -D "$1" -l "$1.log" -w -t 60 start >/dev/null
}

case $cmd in
up)
  [ ! -e "$dir" ] || { echo "sandbox.sh: $dir exists; choose a new directory" >&2; exit 2; }
  mkdir -p "$dir"
  chmod 0755 "$dir"
  [ "$(id -u)" != 0 ] || chown "$PGOWNER" "$dir"
  primary_port=$(free_port)
  replica_port=$(free_port)
  while [ "$replica_port" = "$primary_port" ]; do replica_port=$(free_port); done
  as_pg initdb -D "$dir/primary" -U postgres --auth=trust --data-checksums >/dev/null
  cat >> "$dir/primary/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $primary_port
unix_socket_directories = '$dir'
wal_level = replica
max_wal_senders = 10
hot_standby = on
wal_log_hints = on
cluster_name = 'main'
CONF
  echo "host replication all 127.0.0.1/32 trust" >> "$dir/primary/pg_hba.conf"
  start "$dir/primary"
  as_pg pg_basebackup -h 127.0.0.1 -p "$primary_port" -U postgres -D "$dir/replica" -X stream -c fast -R
  cat >> "$dir/replica/postgresql.auto.conf" <<CONF
port = $replica_port
primary_conninfo = 'host=127.0.0.1 port=$primary_port user=postgres application_name=replica'
CONF
  start "$dir/replica"
  cat > "$dir/env" <<ENV
PRIMARY_PORT=$primary_port
REPLICA_PORT=$replica_port
PRIMARY_DATA=$dir/primary
REPLICA_DATA=$dir/replica
ENV
  for _ in $(seq 1 100); do
    [ "$(sql "$primary_port" "select count(*) from pg_stat_replication where state = 'streaming'")" = 1 ] && break
    sleep 0.1
  done
  echo "primary on 127.0.0.1:$primary_port, replica on 127.0.0.1:$replica_port; . $dir/env"
  ;;
break)
  . "$dir/env"
  as_pg pg_ctl -D "$REPLICA_DATA" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$REPLICA_DATA"
  echo "replica stopped and its data directory deleted"
  ;;
status)
  . "$dir/env"
  for member in primary:$PRIMARY_PORT replica:$REPLICA_PORT; do
    port=${member#*:}
    if role=$(sql "$port" "select case when pg_is_in_recovery() then 'standby' else 'primary' end" 2>/dev/null); then
      echo "${member%%:*} (127.0.0.1:$port): $role"
    else
      echo "${member%%:*} (127.0.0.1:$port): down"
    fi
  done
  ;;
down)
  # Every server running from a directory of the sandbox (a rebuild may have made new ones).
  for pid in "$dir"/*/postmaster.pid; do
    [ -f "$pid" ] || continue
    as_pg pg_ctl -D "$(dirname "$pid")" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
  ;;
*) usage ;;
esac
