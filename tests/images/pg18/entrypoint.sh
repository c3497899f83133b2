#!/bin/sh
# PID 1 of the PostgreSQL 18 test image: initdb on first start, then postgres in the foreground
# as the postgres user, listening on 0.0.0.0 with scram-sha-256 password authentication.
#   POSTGRES_PASSWORD  superuser password (required)
#   POSTGRES_USER      superuser name (default postgres)
#   PGDATA             data directory (default /var/lib/postgresql/18/data)
set -eu
BIN=/usr/lib/postgresql/18/bin
PGDATA=${PGDATA:-/var/lib/postgresql/18/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "pg18-entrypoint: POSTGRES_PASSWORD is required" >&2
    exit 1
fi
as_postgres() {
    setpriv --reuid=postgres --regid=postgres --init-groups "$@"
}
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 0700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    chown postgres "$pwfile"
    as_postgres "$BIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    {
        echo "host all all 0.0.0.0/0 scram-sha-256"
        echo "host all all ::/0 scram-sha-256"
    } >> "$PGDATA/pg_hba.conf"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
    "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c password_encryption=scram-sha-256
