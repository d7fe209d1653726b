# Shared by the steps of the PostgreSQL examples (`. ./lib.sh`): run server programs as the
# server's OS user, talk to a server on loopback, ask a server on another host for its identity.

PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
PGOWNER=${PGOWNER:-postgres}
export PATH="$PGBIN:$PATH"

# as_pg CMD...: CMD as the server's owner (PostgreSQL refuses to run as root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$PGOWNER" -- env PATH="$PATH" "$@"
  else
    "$@"
  fi
}

# sql PORT SQL...: one query on 127.0.0.1:PORT as the superuser, unaligned, tuples only.
sql() {
  port=$1
  shift
  psql -X -h 127.0.0.1 -p "$port" -U postgres -d "${PGDATABASE:-postgres}" -v ON_ERROR_STOP=1 -Atc "$*"
}

# system_id ADDRESS PORT: the system identifier of the server on ADDRESS:PORT, asked over a
# replication connection (the one `pg_basebackup` and a standby make).
system_id() {
  psql -X "host=$1 port=$2 user=postgres replication=true" -Atc IDENTIFY_SYSTEM | cut -d'|' -f1
}

# cluster_of ADDRESS PORT: the `cluster_name` of the server on ADDRESS:PORT, asked over a
# replication connection (as `system_id`).
cluster_of() {
  psql -X "host=$1 port=$2 user=postgres replication=true" -Atc 'SHOW cluster_name'
}

# of_cluster NAME SERVER FOUND: refuses (exit 2) unless FOUND, the `cluster_name` of the server
# SERVER describes, is NAME (the runbooks' lock key). An empty one cannot say: that is said, and
# it passes.
of_cluster() {
  if [ -z "$3" ]; then
    echo "$2 has no cluster_name: it cannot be checked to be of cluster $1 (set cluster_name to check it)" >&2
  elif [ "$3" != "$1" ]; then
    refuse "$2 is of cluster $3 (its cluster_name), not $1"
  fi
}

# refuse MESSAGE...: say why on stderr and exit 2.
refuse() {
  echo "refusing: $*" >&2
  exit 2
}

# running DATA: whether a server runs on data directory DATA.
running() {
  [ -f "$1/postmaster.pid" ] && as_pg pg_ctl -D "$1" status >/dev/null 2>&1
}

# start_server DATA: start the server on DATA and wait until it accepts connections. The server
# must outlive the step: cairn ends whatever a step leaves in its process group or marked with
# its attempt (`CAIRN_ATTEMPT_ID`), so the server starts in a session of its own, unmarked.
start_server() {
  as_pg setsid -w env -u CAIRN_ATTEMPT_ID pg_ctl -D "$1" -l "$1.log" -w -t 120 start
}

# sql_script PORT: run the SQL script on standard input, stopping at the first error.
sql_script() {
  psql -X -q -h 127.0.0.1 -p "$1" -U postgres -d "${PGDATABASE:-postgres}" -v ON_ERROR_STOP=1 >/dev/null
}
