# Sourced by .ci/run: install PostgreSQL from Debian's packages when it is missing, start a
# throw-away server on a free loopback port, and export METAREC_TEST_POSTGRES_DSN (the tests of
# the PostgreSQL interaction log read it). The server stops when the sourcing shell exits.
#
# Locally:  source .ci/postgres.sh   (as root, or with PostgreSQL's binaries installed)
pg_bindir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}
if [ -z "$(pg_bindir)" ]; then
    echo "== installing PostgreSQL (apt-get) =="
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN="$(pg_bindir)"
PG_DIR="$(mktemp -d /tmp/metarec-pg.XXXXXX)"
PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# initdb and postgres refuse to run as root: run them as the postgres user the package creates.
if [ "$(id -u)" = 0 ]; then
    chown postgres "$PG_DIR"
    PG_AS=(runuser -u postgres --)
else
    PG_AS=()
fi
"${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
"${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=on -c max_connections=200" start >/dev/null
stop_postgres() {
    "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
}
trap stop_postgres EXIT
export METAREC_TEST_POSTGRES_DSN="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
echo "== PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT =="
