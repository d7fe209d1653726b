# Shared by the steps of the MariaDB examples (`. ./lib.sh`): talk to a server on loopback, ask
# it for one value, and stop a server and wait until its process is gone.

# The OS user the servers run as when started by root (mariadbd refuses to run as root).
MYOWNER=${MYOWNER:-mysql}
MYUSER=${MYUSER:-root}

# sql PORT SQL...: the statements on 127.0.0.1:PORT as $MYUSER, tab-separated, no headers.
sql() {
  sql_at 127.0.0.1 "$@"
}

# sql_at ADDRESS PORT SQL...: the same on ADDRESS:PORT (a server on another host).
sql_at() {
  local address=$1 port=$2
  shift 2
  mariadb --no-defaults -h "$address" -P "$port" -u "$MYUSER" -N -B -r -e "$*"
}

# on_host HOST CMD...: CMD on HOST over SSH (with $SSH_CONFIG when set: the plan passes on the
# configuration cairn reaches hosts with, `CAIRN_SSH_CONFIG`), in $LIB_DIR there when set; here
# when HOST is empty. Each word of CMD arrives as one word.
on_host() {
  local host=$1
  shift
  if [ -z "$host" ]; then
    "$@"
    return
  fi
  local command="" word
  for word in "$@"; do command+="$(sh_quote "$word") "; done
  ssh ${SSH_CONFIG:+-F "$SSH_CONFIG"} -o BatchMode=yes -o ConnectTimeout=10 \
    -o ServerAliveInterval=15 -o ServerAliveCountMax=3 "$host" -- \
    "${LIB_DIR:+cd $(sh_quote "$LIB_DIR") && }$command"
}

# sh_quote WORD: WORD quoted for any POSIX shell (the remote login shell may be `sh`).
sh_quote() {
  printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# answers PORT: whether a server answers on 127.0.0.1:PORT.
answers() {
  sql "$1" 'SELECT 1' >/dev/null 2>&1
}

# slave_field PORT FIELD: one field of SHOW SLAVE STATUS on the server on PORT (empty when it is
# no replica).
slave_field() {
  mariadb --no-defaults -h 127.0.0.1 -P "$1" -u "$MYUSER" -e 'SHOW SLAVE STATUS\G' |
    sed -n "s/^ *$2: //p"
}

# gtid_covers A B: GTID position A has reached position B in each of B's replication domains
# (the sequence number of each domain; the server-id part does not order them).
gtid_covers() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    n = split(a, xs, ","); for (i = 1; i <= n; i++) { split(xs[i], g, "-"); seq[g[1]] = g[3] + 0 }
    n = split(b, xs, ","); for (i = 1; i <= n; i++) {
      split(xs[i], g, "-"); if (xs[i] != "" && (!(g[1] in seq) || seq[g[1]] < g[3] + 0)) exit 1
    }
  }'
}

# as_owner CMD...: CMD as the servers' owner when run by root, else as is.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$MYOWNER" -- "$@"
  else
    "$@"
  fi
}

# own PATH: PATH (recursively) belongs to the servers' owner, when run by root.
own() {
  if [ "$(id -u)" = 0 ]; then chown -R "$MYOWNER:" "$1"; fi
}

# shutdown PORT: stop the server on PORT and wait until its process has exited (its data
# directory is free then). Nothing to do when nothing answers there.
shutdown() {
  answers "$1" || return 0
  pid=$(cat "$(sql "$1" 'SELECT @@pid_file')")
  sql "$1" 'SHUTDOWN'
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "the server on port $1 (pid $pid) did not exit within a minute" >&2
  return 1
}

# serving_from DIR: the pids of the mariadbd processes running from data directory DIR (none:
# exit 1). Asked of the processes themselves, for a server that no longer answers.
serving_from() {
  local want found=1 pid dir
  want=$(realpath -m "$1")
  for pid in $(pgrep -x mariadbd); do
    dir=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^--datadir=//p' | tail -n 1)
    if [ -n "$dir" ] && [ "$(realpath -m "$dir")" = "$want" ]; then
      echo "$pid"
      found=0
    fi
  done
  return $found
}

# refuse MESSAGE...: say why on stderr and exit 2.
refuse() {
  echo "refusing: $*" >&2
  exit 2
}
