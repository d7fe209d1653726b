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
