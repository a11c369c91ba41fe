#!/usr/bin/env bash
# The main job on real input: the Chinook sample's invoices, delivered by `backfill` to the
# local sandbox, then counted and summed from what the sandbox received.
#
# Creates (or re-creates) the database resonance_demo on the local PostgreSQL server, which it
# finds, starts or installs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/postgres.sh

DEMO_DB=resonance_demo
PORT="${DEMO_SANDBOX_PORT:-18080}"
WORK=$(mktemp -d)
SANDBOX_PID=""
cleanup() {
    [ -n "$SANDBOX_PID" ] && kill "$SANDBOX_PID" 2>/dev/null && wait "$SANDBOX_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }

step "PostgreSQL"
ensure_postgres
echo "server: $PG_SERVER_URL"

step "Building resonance-sync (release)"
cargo build --release --quiet
BIN=target/release/resonance-sync

step "Loading the Chinook sample into a fresh database '$DEMO_DB'"
psql "$PG_SERVER_URL/postgres" -Xq -v ON_ERROR_STOP=1 \
    -c "DROP DATABASE IF EXISTS $DEMO_DB WITH (FORCE)" -c "CREATE DATABASE $DEMO_DB"
# The sample creates its own database first; everything after its \c line goes into ours.
sed '1,/^\\c chinook;/d' data/chinook/chinook.sql |
    psql "$PG_SERVER_URL/$DEMO_DB" -Xq -v ON_ERROR_STOP=1
psql "$PG_SERVER_URL/$DEMO_DB" -Xq -v ON_ERROR_STOP=1 <<'SQL'
-- The one change resonance-sync needs in a CRM: a sync flag, and an index for the poll.
ALTER TABLE invoice ADD COLUMN synced_to_resonance boolean NOT NULL DEFAULT false;
CREATE INDEX invoice_unsynced ON invoice (invoice_id) WHERE NOT synced_to_resonance;
SQL
psql "$PG_SERVER_URL/$DEMO_DB" -XAtc \
    "SELECT format('invoices: %s, total %s', count(*), sum(total)) FROM invoice"

export DATABASE_URL="$PG_SERVER_URL/$DEMO_DB"
export RESONANCE_API_KEY="sk_demo_$(date +%s)"
export RESONANCE_SYNC_CONFIG=demo/config.toml
export RESONANCE_ENDPOINT="http://127.0.0.1:$PORT/resonance-api/manual-event"

step "Starting the sandbox (a local stand-in for the Resonance API) on 127.0.0.1:$PORT"
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "port $PORT is already in use by another program; choose another: DEMO_SANDBOX_PORT=18090 $0" >&2
    exit 1
fi
"$BIN" sandbox --listen "127.0.0.1:$PORT" >"$WORK/received.jsonl" 2>"$WORK/sandbox.log" &
SANDBOX_PID=$!
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    kill -0 "$SANDBOX_PID" 2>/dev/null || { cat "$WORK/sandbox.log" >&2; exit 1; }
    sleep 0.1
done

step "resonance-sync check (validates, prints a sample event, sends nothing)"
"$BIN" check

step "resonance-sync backfill"
status=0
"$BIN" backfill || status=$?

kill "$SANDBOX_PID" && wait "$SANDBOX_PID" 2>/dev/null || true
SANDBOX_PID=""

step "What the sandbox received"
# Each line is one accepted event; load them into a scratch table to count and sum them with
# PostgreSQL's exact numeric arithmetic.
psql "$PG_SERVER_URL/$DEMO_DB" -XAtq -v ON_ERROR_STOP=1 <<SQL
CREATE TEMP TABLE received (line jsonb);
\copy received FROM '$WORK/received.jsonl' WITH (FORMAT csv, QUOTE e'\x01', DELIMITER e'\x02')
SELECT format('delivered: %s events (%s distinct Idempotency-Keys), total %s',
              count(*), count(DISTINCT line->>'idempotency_key'),
              sum((line #>> '{event,metadata,order_value}')::numeric))
  FROM received;
SQL
psql "$PG_SERVER_URL/$DEMO_DB" -XAt -c \
    "SELECT format('marked synced: %s invoices; left unsynced: %s', count(*) FILTER (WHERE synced_to_resonance), count(*) FILTER (WHERE NOT synced_to_resonance)) FROM invoice"
echo "first event received:"
head -n 1 "$WORK/received.jsonl"
exit "$status"
