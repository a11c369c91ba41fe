# Finds or starts a local PostgreSQL server for the demo and the tests. Sourced, not run.
#
# PG_SERVER_URL (default postgres://postgres@127.0.0.1:5432) names the server. When nothing
# answers there: on a Debian-like machine where PostgreSQL is installed but stopped, start it;
# where it is missing and we are root, install it with apt-get; otherwise say what is needed.

PG_SERVER_URL="${PG_SERVER_URL:-postgres://postgres@127.0.0.1:5432}"

pg_answers() {
    command -v psql >/dev/null 2>&1 &&
        psql "$PG_SERVER_URL/postgres" -XAtqc 'SELECT 1' >/dev/null 2>&1
}

pg_start_installed_cluster() {
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || return 1
    echo "postgres: starting the installed PostgreSQL $version cluster" >&2
    if [ "$(id -u)" = 0 ]; then
        pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>&1 | grep -v 'already running' >&2 || true
    elif command -v sudo >/dev/null 2>&1; then
        sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
    else
        return 1
    fi
}

pg_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    echo "postgres: PostgreSQL is not installed; installing it with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || return 1
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    # Tests and the demo connect as postgres over loopback without a password, as on a
    # developer machine; only done on a cluster this script installed itself.
    sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' \
        "/etc/postgresql/$version/main/pg_hba.conf"
    pg_start_installed_cluster
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload >&2 || true
}

# Makes sure a server answers at PG_SERVER_URL, or explains what is missing and fails.
ensure_postgres() {
    pg_answers && return 0
    if [ -d /etc/postgresql ] && ls /etc/postgresql/*/main >/dev/null 2>&1; then
        pg_start_installed_cluster || true
    else
        pg_install || true
    fi
    local tries=0
    until pg_answers; do
        tries=$((tries + 1))
        if [ "$tries" -ge 30 ]; then
            cat >&2 <<MSG
postgres: no PostgreSQL server answers at $PG_SERVER_URL.
  Needed: a PostgreSQL server (version 12 or later) reachable there as a superuser without a
  password, and the psql client. On Debian or Ubuntu, as root: apt-get install postgresql.
  Or point PG_SERVER_URL at a server you have, e.g. PG_SERVER_URL=postgres://me:pw@db:5432
MSG
            return 1
        fi
        sleep 1
    done
}
