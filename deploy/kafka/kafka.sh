#!/usr/bin/env bash
# A real single-node Apache Kafka (KRaft) broker on 127.0.0.1, resolved from
# Maven Central, for development and tests. No Docker, no tarball.
#
#   deploy/kafka/kafka.sh start|stop|status|bootstrap [--port P] [--state-dir DIR]
#
#   start      resolve the broker's jars (cached in ~/.m2), format storage in the
#              state directory on first use, start the broker and wait until it
#              serves requests. Idempotent: a running broker is left alone.
#   stop       stop it cleanly (SIGTERM, then SIGKILL after 30 s).
#   status     exit 0 when running, 1 otherwise.
#   bootstrap  print the bootstrap address (127.0.0.1:PORT).
#
# Environment (flags win): KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (PORT+1),
# KAFKA_STATE_DIR (<repo>/.kafka), KAFKA_HEAP_OPTS (-Xms256m -Xmx768m),
# KAFKA_START_TIMEOUT seconds (90).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

cmd=${1:-}
[ $# -gt 0 ] && shift
port=${KAFKA_PORT:-9092}
state=${KAFKA_STATE_DIR:-$repo/.kafka}
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --state-dir) state=$2; shift 2 ;;
    *) echo "kafka.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
cport=${KAFKA_CONTROLLER_PORT:-$((port + 1))}
pidfile=$state/broker.pid
logfile=$state/broker.log

die() { echo "kafka.sh: $*" >&2; exit 1; }

running() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Resolve the broker's runtime classpath once per pom.xml version; Maven keeps
# the jars in ~/.m2, so later runs need no network.
classpath() {
  local cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/ncf-stream
  local key
  key=$(sha256sum "$here/pom.xml" | cut -c1-16)
  local cp_file=$cache_dir/kafka-classpath-$key.txt
  if [ ! -s "$cp_file" ] || ! xargs -d: -a "$cp_file" ls >/dev/null 2>&1; then
    mkdir -p "$cache_dir"
    echo "kafka.sh: resolving the Kafka broker from Maven Central (first run only)" >&2
    mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:build-classpath \
      -Dmdep.outputFile="$cp_file.tmp" >&2 || die "maven could not resolve the broker"
    mv "$cp_file.tmp" "$cp_file"
  fi
  cat "$cp_file"
}

# exec: run in a subshell, the broker's pid is the subshell's, so stop can signal it.
java_exec() {
  local cp=$1; shift
  # shellcheck disable=SC2086
  exec java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.xml" -cp "$cp" "$@"
}

start() {
  if running; then
    echo "kafka.sh: broker already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"
    return 0
  fi
  port_open "$port" && die "port $port is taken by another process"
  command -v java >/dev/null || die "java not found (Java 17+ is required)"
  mkdir -p "$state"
  local cp
  cp=$(classpath)
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@LOG_DIR@|$state/data|g" \
    "$here/server.properties" > "$state/server.properties"
  if [ ! -f "$state/data/meta.properties" ]; then
    local cluster_id
    cluster_id=$(java_exec "$cp" kafka.tools.StorageTool random-uuid)
    (java_exec "$cp" kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$state/server.properties") >"$state/format.log" 2>&1 \
      || { cat "$state/format.log" >&2; die "formatting storage failed"; }
  fi
  : > "$logfile"
  # A Ctrl-C or hang-up in the caller's terminal reaches its whole process group, the
  # broker included: ignored here (the JVM keeps a signal ignored at start), so whoever
  # started the broker stops it, after its own clients have said goodbye. `stop` uses TERM.
  (trap '' HUP INT; java_exec "$cp" kafka.Kafka "$state/server.properties") </dev/null >>"$logfile" 2>&1 &
  echo $! > "$pidfile"
  wait_ready
  echo "kafka.sh: broker running (pid $(cat "$pidfile")) on 127.0.0.1:$port, state in $state"
}

# Ready means the broker finished start-up (it logs "Kafka Server started")
# and its client port accepts connections.
wait_ready() {
  local deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-90}))
  until grep -q "Kafka Server started" "$logfile" && port_open "$port"; do
    if ! running; then
      tail -n 40 "$logfile" >&2
      rm -f "$pidfile"
      die "broker exited during start-up (log: $logfile)"
    fi
    [ $SECONDS -ge $deadline ] && { tail -n 40 "$logfile" >&2; stop; die "broker not ready in time"; }
    sleep 0.3
  done
}

stop() {
  if ! running; then
    rm -f "$pidfile"
    echo "kafka.sh: broker not running"
    return 0
  fi
  local pid
  pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.3
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "kafka.sh: broker did not stop in 30 s, killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "kafka.sh: broker stopped"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) if running; then echo "running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; else echo "stopped"; exit 1; fi ;;
  bootstrap) echo "127.0.0.1:$port" ;;
  *) echo "usage: kafka.sh start|stop|status|bootstrap [--port P] [--state-dir DIR]" >&2; exit 2 ;;
esac
