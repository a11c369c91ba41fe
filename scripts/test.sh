#!/usr/bin/env bash
# The whole test suite against a real PostgreSQL server (found, started or installed as the demo
# does). Each test creates and drops its own database, so tests run in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/postgres.sh
ensure_postgres
# The money test generates locales (de_DE, ja_JP, ar_KW) from Debian's locale sources.
if [ ! -d /usr/share/i18n/locales ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing Debian's locales package (locale sources for the money test)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq locales >&2 ||
        { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq locales >&2; }
fi
# Databases left by an interrupted earlier run.
psql "$PG_SERVER_URL/postgres" -XAtqc \
    "SELECT 'DROP DATABASE IF EXISTS ' || quote_ident(datname) || ' WITH (FORCE);' FROM pg_database WHERE datname LIKE 'rs\_test\_%'" |
    psql "$PG_SERVER_URL/postgres" -Xq >/dev/null
export RESONANCE_TEST_DATABASE_URL="$PG_SERVER_URL"
exec cargo test --all-targets "$@"
