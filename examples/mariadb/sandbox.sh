#!/usr/bin/env bash
# A MariaDB primary and two GTID replicas on free loopback ports, in one directory, for trying the
# examples (and for their tests). Servers run with `--no-defaults` (nothing of the machine's own
# MariaDB is read or touched), on private sockets, never on port 3306. Run as root (the servers
# run as `mysql`) or as the user who will own them.
#
#   sandbox.sh up DIR            create DIR/primary, DIR/replica1, DIR/replica2, start them; write DIR/env
#   sandbox.sh start DIR MEMBER  start MEMBER's server on its data directory, wait until it answers
#   sandbox.sh stop DIR MEMBER   stop MEMBER's server cleanly
#   sandbox.sh crash DIR MEMBER  kill -9 MEMBER's server
#   sandbox.sh break DIR MEMBER  crash MEMBER and delete its data directory
#   sandbox.sh status DIR        each member's role, position and replication threads
#   sandbox.sh down DIR          kill every server of the sandbox and delete DIR
#
# DIR/env holds, for `. DIR/env`: PRIMARY_PORT, REPLICA1_PORT, REPLICA2_PORT and
# PRIMARY_DATA, REPLICA1_DATA, REPLICA2_DATA. Every member has binary logs, GTIDs in strict mode
# and `log_slave_updates`, so any of them can be a source or become the primary.
set -euo pipefail
cd "$(dirname "$0")"
. ./lib.sh

usage() { sed -n '2,17p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
member=${3:-}
members="primary replica1 replica2"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

need_member() {
  case " $members " in *" $member "*) ;; *) echo "sandbox.sh: MEMBER is one of: $members" >&2; exit 2 ;; esac
  [ -f "$dir/env" ] || { echo "sandbox.sh: $dir is no sandbox (no $dir/env)" >&2; exit 2; }
}

port_of() { sed -n "s/^$(echo "$1" | tr a-z A-Z)_PORT=//p" "$dir/env"; }

# The server of a member: its options are all here (`--no-defaults`). It runs in a session of its
# own, unmarked, so that it outlives a step that starts it (cairn ends what a step leaves behind).
start_member() { # NAME
  local name=$1 port id
  port=$(port_of "$name")
  id=$(sed -n "s/^$name //p" "$dir/server-ids")
  if answers "$port"; then return 0; fi
  local user=()
  [ "$(id -u)" != 0 ] || user=(--user="$MYOWNER")
  # One already starting on the directory (a start tried again before it answered) is waited for.
  serving_from "$dir/$name" >/dev/null ||
  setsid -f env -u CAIRN_ATTEMPT_ID mariadbd --no-defaults "${user[@]}" \
    --datadir="$dir/$name" --port="$port" --bind-address=127.0.0.1 \
    --socket="$dir/$name.sock" --tmpdir="$dir/$name.tmp" --pid-file="$dir/$name.pid" --log-error="$dir/$name.err" \
    --server-id="$id" --log-bin=binlog --log-slave-updates --gtid-strict-mode=1 \
    --binlog-format=ROW --skip-slave-start --skip-name-resolve \
    --innodb-buffer-pool-size=16M --innodb-log-file-size=16M --performance-schema=0 \
    --max-connections=50 </dev/null >/dev/null 2>&1
  for _ in $(seq 1 1200); do
    answers "$port" && return 0
    # A server that exited (its port taken meanwhile, say) will not answer.
    if [ -f "$dir/$name.pid" ] && ! kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then break; fi
    grep -q 'Do you already have another server running on port' "$dir/$name.err" 2>/dev/null && break
    sleep 0.1
  done
  echo "sandbox.sh: $name did not answer on port $port; from $dir/$name.err:" >&2
  tail -n 5 "$dir/$name.err" >&2 || true
  return 1
}

crash_member() { # NAME
  local pid
  pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 0
  kill -9 "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  rm -f "$dir/$1.pid"
}

case $cmd in
up)
  [ ! -e "$dir" ] || { echo "sandbox.sh: $dir exists; choose a new directory" >&2; exit 2; }
  mkdir -p "$dir"
  chmod 0755 "$dir"
  own "$dir"
  : > "$dir/env"
  # A sandbox that fails half-way leaves no server running.
  trap 'for name in $members; do crash_member "$name"; done' EXIT
  n=0
  for name in $members; do
    n=$((n + 1))
    upper=$(echo "$name" | tr a-z A-Z)
    echo "$upper""_DATA=$dir/$name" >> "$dir/env"
    echo "$name $n" >> "$dir/server-ids"
    # A temporary directory of its own: servers bootstrapping at once in a shared /tmp can
    # trip over each other's temporary tables.
    mkdir -p "$dir/$name.tmp"
    own "$dir/$name.tmp"
    as_owner env TMPDIR="$dir/$name.tmp" mariadb-install-db --no-defaults --datadir="$dir/$name" \
      --auth-root-authentication-method=normal --skip-test-db >"$dir/$name.install.log" 2>&1 ||
      { cat "$dir/$name.install.log" >&2; exit 1; }
    # A free port may be taken by another program before the server binds it: then another.
    for try in 1 2 3 4 5; do
      port=$(free_port)
      while [ "$port" = 3306 ] || grep -q "=$port\$" "$dir/env"; do port=$(free_port); done
      sed -i "/^$upper""_PORT=/d" "$dir/env"
      echo "$upper""_PORT=$port" >> "$dir/env"
      start_member "$name" && break
      [ "$try" != 5 ] || exit 1
      rm -f "$dir/$name.err"
    done
    # The examples' user from loopback, with no password, on every member; not replicated (each
    # server made its own).
    mariadb --no-defaults -S "$dir/$name.sock" -u root -e \
      "SET sql_log_bin=0; CREATE USER IF NOT EXISTS root@'127.0.0.1'; GRANT ALL ON *.* TO root@'127.0.0.1' WITH GRANT OPTION;"
  done
  . "$dir/env"
  for port in "$REPLICA1_PORT" "$REPLICA2_PORT"; do
    sql "$port" "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=$PRIMARY_PORT, MASTER_USER='root', MASTER_USE_GTID=slave_pos; START SLAVE"
  done
  sql "$PRIMARY_PORT" 'CREATE DATABASE IF NOT EXISTS app; CREATE TABLE IF NOT EXISTS app.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(100))'
  gtid=$(sql "$PRIMARY_PORT" 'SELECT @@gtid_binlog_pos')
  for port in "$REPLICA1_PORT" "$REPLICA2_PORT"; do
    [ "$(sql "$port" "SELECT MASTER_GTID_WAIT('$gtid', 60)")" = 0 ] ||
      { echo "sandbox.sh: the replica on port $port did not catch up" >&2; exit 1; }
  done
  trap - EXIT
  echo "primary on 127.0.0.1:$PRIMARY_PORT, replicas on 127.0.0.1:$REPLICA1_PORT and 127.0.0.1:$REPLICA2_PORT; . $dir/env"
  ;;
start)
  need_member
  start_member "$member" || exit 1
  ;;
stop)
  need_member
  shutdown "$(port_of "$member")"
  ;;
crash)
  need_member
  crash_member "$member"
  ;;
break)
  need_member
  crash_member "$member"
  rm -rf "${dir:?}/$member"
  echo "$member killed and its data directory deleted"
  ;;
status)
  [ -f "$dir/env" ] || { echo "sandbox.sh: $dir is no sandbox (no $dir/env)" >&2; exit 2; }
  for name in $members; do
    port=$(port_of "$name")
    if ! answers "$port"; then
      echo "$name (127.0.0.1:$port): down"
    elif [ -n "$(slave_field "$port" Master_Port)" ]; then
      echo "$name (127.0.0.1:$port): replica of port $(slave_field "$port" Master_Port)," \
        "io $(slave_field "$port" Slave_IO_Running), sql $(slave_field "$port" Slave_SQL_Running)," \
        "gtid $(sql "$port" 'SELECT @@gtid_current_pos')"
    else
      echo "$name (127.0.0.1:$port): primary, gtid $(sql "$port" 'SELECT @@gtid_current_pos')"
    fi
  done
  ;;
down)
  # Every server of the sandbox, whatever runs it now.
  [ -f "$dir/env" ] || { rm -rf "$dir"; exit 0; }
  for name in $members; do crash_member "$name"; done
  # And any other server running from the sandbox's directories (the pid file names only the
  # last one started on a member).
  for pid in $(pgrep -x mariadbd); do
    case "$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | sed -n 's/^--datadir=//p' | tail -n 1)" in
    "$dir"/*)
      kill -9 "$pid" 2>/dev/null || continue
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
      ;;
    esac
  done
  rm -rf "$dir"
  ;;
*) usage ;;
esac
