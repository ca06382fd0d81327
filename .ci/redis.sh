#!/usr/bin/env bash
# Start or stop the loopback Redis servers the remote-tier tests and benchmarks use:
#   standalone  127.0.0.1:6390        requirepass (so the auth path is exercised), no persistence
#   cluster     127.0.0.1:7001-7003   three masters, no replicas, no persistence
# usage: .ci/redis.sh start|stop|env
# KVTIER_REDIS_DIR (default /tmp/kvtier-redis-$UID) holds their configs, logs and pid files.
# After `start`, `.ci/redis.sh env` prints the two URLs the tests read.
set -euo pipefail

DIR="${KVTIER_REDIS_DIR:-/tmp/kvtier-redis-$(id -u)}"
PASSWORD="${KVTIER_REDIS_PASSWORD:-kvtier-ci}"
STANDALONE_PORT=6390
CLUSTER_PORTS=(7001 7002 7003)

ensure_installed() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        echo "redis.sh: installing redis-server with apt" >&2
        apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    fi
}

# wait_ping PORT [PASSWORD]: until the server answers PONG, at most 10 s.
wait_ping() {
    local port=$1 auth=()
    [[ $# -ge 2 ]] && auth=(--no-auth-warning -a "$2")
    for _ in $(seq 100); do
        [[ "$(redis-cli -h 127.0.0.1 -p "$port" "${auth[@]}" ping 2>/dev/null)" == PONG ]] && return 0
        sleep 0.1
    done
    echo "redis.sh: server on 127.0.0.1:$port did not answer within 10 s" >&2
    return 1
}

# start_server PORT NAME EXTRA_ARGS...: a daemonized loopback server without persistence.
start_server() {
    local port=$1 name=$2
    shift 2
    mkdir -p "$DIR/$name"
    redis-server --bind 127.0.0.1 --port "$port" --daemonize yes \
        --dir "$DIR/$name" --pidfile "$DIR/$name/redis.pid" --logfile "$DIR/$name/redis.log" \
        --save "" --appendonly no --enable-debug-command local "$@"
}

cluster_ok() {
    redis-cli -h 127.0.0.1 -p "${CLUSTER_PORTS[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}

start() {
    ensure_installed
    if [[ "$(redis-cli -h 127.0.0.1 -p "$STANDALONE_PORT" --no-auth-warning -a "$PASSWORD" ping 2>/dev/null)" == PONG ]] \
        && cluster_ok; then
        echo "redis.sh: servers already running" >&2
        env_lines
        return 0
    fi
    mkdir -p "$DIR"
    start_server "$STANDALONE_PORT" standalone --requirepass "$PASSWORD"
    for port in "${CLUSTER_PORTS[@]}"; do
        start_server "$port" "cluster-$port" --cluster-enabled yes \
            --cluster-config-file "$DIR/cluster-$port/nodes.conf" --cluster-node-timeout 2000
    done
    wait_ping "$STANDALONE_PORT" "$PASSWORD"
    local nodes=()
    for port in "${CLUSTER_PORTS[@]}"; do
        wait_ping "$port"
        nodes+=("127.0.0.1:$port")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$DIR/cluster-create.log"
    for _ in $(seq 100); do
        if cluster_ok; then
            env_lines
            return 0
        fi
        sleep 0.1
    done
    echo "redis.sh: cluster did not reach cluster_state:ok within 10 s" >&2
    return 1
}

stop() {
    redis-cli -h 127.0.0.1 -p "$STANDALONE_PORT" --no-auth-warning -a "$PASSWORD" \
        shutdown nosave >/dev/null 2>&1 || true
    for port in "${CLUSTER_PORTS[@]}"; do
        redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
    done
    rm -rf "$DIR"
}

env_lines() {
    echo "KVTIER_REDIS_URL=redis://:$PASSWORD@127.0.0.1:$STANDALONE_PORT/0"
    echo "KVTIER_REDIS_CLUSTER_URL=redis://127.0.0.1:${CLUSTER_PORTS[0]}"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) env_lines ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
