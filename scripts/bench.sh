#!/usr/bin/env bash
# Benchmark: how fast `backfill` drains a backlog, and how much memory it takes, next to the naive
# pattern (select all unsynced rows, POST one by one, UPDATE each row after its POST).
#
#   scripts/bench.sh [ROWS...]          default: 20000 200000
#
# For each backlog size it loads a fresh database, then for each API latency starts the sandbox
# (`resonance-sync sandbox --quiet --latency X`), runs `backfill` against a fresh copy of the
# backlog, and then the naive pattern (examples/naive.rs) against another. It also measures the
# sandbox alone (examples/loadgen.rs, same concurrency), so that it can be seen not to be the
# bottleneck. Prints one table and checks the targets of issue 4.
#
# Runs with an instant API are bound by CPU and vary: each is repeated BENCH_RUNS=5 times, the
# daemon's and the naive pattern's runs in turn, and the median rate (and the highest peak RSS)
# is reported; every run's rate is listed under the table.
#
# Settings (environment): BENCH_LATENCIES="0ms 20ms", BENCH_CONCURRENCY=64, BENCH_BATCH=500,
# BENCH_NAIVE_MAX=5000 (the naive pattern is timed on at most this many rows, and on at most
# 10 s worth of rows at the API's latency: its rate per row does not change with the backlog).
# BENCH_SANDBOX_PORT=18631 (the first free port from there on). PG_SERVER_URL as for
# scripts/test.sh. Databases rs_bench_* are created and dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/postgres.sh

SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(20000 200000)
read -r -a LATENCIES <<<"${BENCH_LATENCIES:-0ms 20ms}"
CONCURRENCY="${BENCH_CONCURRENCY:-64}"
BATCH="${BENCH_BATCH:-500}"
NAIVE_MAX="${BENCH_NAIVE_MAX:-5000}"
RUNS="${BENCH_RUNS:-5}"
PORT="${BENCH_SANDBOX_PORT:-18631}"
ENDPOINT=""
export RESONANCE_API_KEY="sk_bench_$(date +%s)"

WORK=$(mktemp -d)
SANDBOX_PID=""
stop_sandbox() {
    if [ -n "$SANDBOX_PID" ]; then
        kill "$SANDBOX_PID" 2>/dev/null || true
        wait "$SANDBOX_PID" 2>/dev/null || true
        SANDBOX_PID=""
    fi
}
cleanup() {
    stop_sandbox
    for db in $(psql "$PG_SERVER_URL/postgres" -XAtqc \
        "SELECT datname FROM pg_database WHERE datname LIKE 'rs\_bench\_%'" 2>/dev/null); do
        psql "$PG_SERVER_URL/postgres" -Xqc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '%s\n' "$*" >&2; }
sql() { psql "$PG_SERVER_URL/$1" -XAtq -v ON_ERROR_STOP=1 -c "$2"; }

ensure_postgres
say "building the release binary and the benchmark's examples (naive, loadgen)"
cargo build --release --quiet --bin resonance-sync --example naive --example loadgen
BIN=target/release/resonance-sync
NAIVE=target/release/examples/naive
LOADGEN=target/release/examples/loadgen
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# The machine's CPU counters (/proc/stat): "total steal", for the share of time a virtual
# machine's hypervisor gave to others, which slows every figure in the table.
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 11; i++) t += $i; print t, $9 }' /proc/stat; }
CPU_BEFORE=$(cpu_ticks)

# A backlog of `rows` orders, all unsynced, with the partial index the README asks for.
make_template() {
    local rows=$1 db=rs_bench_template_$1
    sql postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
    sql postgres "CREATE DATABASE $db" >/dev/null
    sql "$db" "
        CREATE TABLE orders (
          id                  bigserial PRIMARY KEY,
          user_email          text,
          order_value         numeric(12,2),
          currency            char(3)     NOT NULL DEFAULT 'USD',
          created_at          timestamptz NOT NULL DEFAULT now(),
          synced_to_resonance boolean     NOT NULL DEFAULT false
        );
        INSERT INTO orders (user_email, order_value)
          SELECT 'customer' || g || '@example.com', (g % 1000) + 0.99
            FROM generate_series(1, $rows) g;
        CREATE INDEX orders_unsynced ON orders (id) WHERE NOT synced_to_resonance;" >/dev/null
    sql "$db" "VACUUM ANALYZE orders" >/dev/null
}

# A fresh copy of the backlog for one run.
fresh_db() {
    sql postgres "DROP DATABASE IF EXISTS rs_bench_run WITH (FORCE)" >/dev/null
    sql postgres "CREATE DATABASE rs_bench_run TEMPLATE rs_bench_template_$1" >/dev/null
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts the sandbox on the first free port from BENCH_SANDBOX_PORT on; sets ENDPOINT.
start_sandbox() {
    while port_taken "$PORT"; do PORT=$((PORT + 1)); done
    ENDPOINT="http://127.0.0.1:$PORT/resonance-api/manual-event"
    "$BIN" sandbox --listen "127.0.0.1:$PORT" --quiet --latency "$1" \
        >/dev/null 2>"$WORK/sandbox.log" &
    SANDBOX_PID=$!
    for _ in $(seq 100); do
        kill -0 "$SANDBOX_PID" 2>/dev/null || { cat "$WORK/sandbox.log" >&2; exit 1; }
        port_taken "$PORT" && return 0
        sleep 0.05
    done
    say "the sandbox did not start"; exit 1
}

# The daemon reaches the database without TLS, as the naive pattern does (NoTls), so that the
# two pay the same for it; a user's default (sslmode=prefer) encrypts even on loopback.
write_config() {
    cat >"$WORK/config.toml" <<TOML
[database]
url = "$PG_SERVER_URL/rs_bench_run?sslmode=disable"
[resonance]
endpoint = "$ENDPOINT"
brand_id = "brand_bench"
concurrency = $CONCURRENCY
[[mapping]]
name = "orders"
event_type = "purchase"
interval = "30s"
batch_size = $BATCH
key = "id"
email = "user_email"
query = "SELECT id, user_email, order_value, currency FROM orders WHERE NOT synced_to_resonance"
mark_synced = "UPDATE orders SET synced_to_resonance = true WHERE id = ANY(\$1)"
TOML
}

now() { date +%s.%N; }
millis() { # "20ms" -> 20, "0s" -> 0, "1s" -> 1000
    case "$1" in
    *ms) echo "${1%ms}" ;;
    *s) echo "$(( ${1%s} * 1000 ))" ;;
    *) echo "$1" ;;
    esac
}
mib() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }

# Runs a command under /usr/bin/time; sets ELAPSED (s) and RSS_KB.
timed() {
    local start end
    start=$(now)
    /usr/bin/time -f '%M' -o "$WORK/rss" "$@" >"$WORK/out" 2>"$WORK/err" || {
        say "failed: $*"; cat "$WORK/out" "$WORK/err" >&2; exit 1
    }
    end=$(now)
    ELAPSED=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
    RSS_KB=$(tail -n 1 "$WORK/rss")
}

# "rate<TAB>rss_kb" lines -> the median rate and the highest peak RSS.
median_and_peak() {
    sort -n "$1" | awk -F'\t' '{ rate[NR] = $1; if ($2 > peak) peak = $2 }
        END { printf "%s\t%s", rate[int((NR + 1) / 2)], peak }'
}

RESULTS="$WORK/results.tsv" # rows latency concurrency impl rate rss_kb rows_timed
: >"$RESULTS"
SANDBOX_RATES="$WORK/sandbox.tsv"
: >"$SANDBOX_RATES"
ALL_RUNS="$WORK/all_runs.tsv" # rows latency daemon_rates naive_rates (comma-separated, in run order)
: >"$ALL_RUNS"

for rows in "${SIZES[@]}"; do
    say "loading a backlog of $rows orders"
    make_template "$rows"
    for latency in "${LATENCIES[@]}"; do
        ms=$(millis "$latency")

        say "  latency $latency: the sandbox alone (loadgen, $CONCURRENCY in flight)"
        start_sandbox "$latency"
        requests=$rows
        [ "$requests" -le 20000 ] || requests=20000
        [ "$ms" -eq 0 ] || [ "$requests" -le $((CONCURRENCY * 3000 / ms)) ] ||
            requests=$((CONCURRENCY * 3000 / ms))
        "$LOADGEN" "$ENDPOINT" "$requests" "$CONCURRENCY" >"$WORK/out"
        rate=$(sed -n 's/.*rate \([0-9.]*\) req\/s.*/\1/p' "$WORK/out")
        printf '%s\t%s\t%s\n' "$latency" "$CONCURRENCY" "$rate" >>"$SANDBOX_RATES"
        stop_sandbox

        # CPU-bound runs (an instant API) vary from run to run: take the median of RUNS. The
        # daemon's and the naive pattern's runs alternate, so that a busy or a quiet spell on the
        # machine falls on both alike.
        runs=1
        [ "$ms" -ne 0 ] || runs=$RUNS
        naive_rows=$rows
        [ "$naive_rows" -le "$NAIVE_MAX" ] || naive_rows=$NAIVE_MAX
        [ "$ms" -eq 0 ] || [ "$naive_rows" -le $((10000 / ms)) ] || naive_rows=$((10000 / ms))
        say "  latency $latency: resonance-sync backfill of $rows rows and the naive pattern" \
            "($naive_rows of them), in turn, $runs time(s)"
        : >"$WORK/runs"
        : >"$WORK/naive_runs"
        for _ in $(seq "$runs"); do
            fresh_db "$rows"
            start_sandbox "$latency"
            write_config
            timed "$BIN" --config "$WORK/config.toml" backfill
            stop_sandbox
            left=$(sql rs_bench_run "SELECT count(*) FROM orders WHERE NOT synced_to_resonance")
            [ "$left" -eq 0 ] || { say "backfill left $left rows unsynced"; cat "$WORK/out" >&2; exit 1; }
            awk -v n="$rows" -v s="$ELAPSED" -v m="$RSS_KB" 'BEGIN { printf "%.0f\t%s\n", n / s, m }' >>"$WORK/runs"

            fresh_db "$rows"
            start_sandbox "$latency"
            timed "$NAIVE" "$PG_SERVER_URL/rs_bench_run" "$ENDPOINT" "$naive_rows"
            stop_sandbox
            rate=$(sed -n 's/.*rate \([0-9.]*\) rows\/s.*/\1/p' "$WORK/out")
            printf '%.0f\t%s\n' "$rate" "$RSS_KB" >>"$WORK/naive_runs"
        done
        printf '%s\t%s\t%s\tresonance-sync\t%s\t%s\n' \
            "$rows" "$latency" "$CONCURRENCY" "$(median_and_peak "$WORK/runs")" "$rows" >>"$RESULTS"
        printf '%s\t%s\t1\tnaive\t%s\t%s\n' \
            "$rows" "$latency" "$(median_and_peak "$WORK/naive_runs")" "$naive_rows" >>"$RESULTS"
        printf '%s\t%s\t%s\t%s\n' "$rows" "$latency" \
            "$(cut -f1 "$WORK/runs" | paste -sd,)" "$(cut -f1 "$WORK/naive_runs" | paste -sd,)" >>"$ALL_RUNS"
    done
    sql postgres "DROP DATABASE IF EXISTS rs_bench_template_$rows WITH (FORCE)" >/dev/null
done

pg_version=$(sql postgres "SHOW server_version")
commit=$(sql postgres "SHOW synchronous_commit")
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)," \
    "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1);" \
    "PostgreSQL $pg_version (synchronous_commit=$commit) on the same machine"
echo "load average (1, 5, 15 min): $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after" \
    "(other work on the machine makes every figure noisier)"
read -r total_before steal_before <<<"$CPU_BEFORE"
read -r total_after steal_after <<<"$(cpu_ticks)"
echo "CPU time taken by the hypervisor (steal) during the run:" \
    "$(awk -v s=$((steal_after - steal_before)) -v t=$((total_after - total_before)) \
        'BEGIN { printf "%.0f%%", (t > 0 ? 100 * s / t : 0) }')" \
    "(on a virtual machine; a high share slows every figure)"
echo "resonance-sync: concurrency $CONCURRENCY, batch_size $BATCH; naive: one request at a time;" \
    "with an instant API each rate is the median of $RUNS runs"
echo
printf '%-8s  %-7s  %-11s  %-14s  %9s  %8s  %9s\n' \
    rows latency concurrency implementation events/s of-ideal "peak RSS"
while IFS=$'\t' read -r rows latency conc impl rate rss timed_rows; do
    ms=$(millis "$latency")
    ideal="-"
    [ "$ms" -eq 0 ] || ideal=$(awk -v r="$rate" -v c="$conc" -v ms="$ms" \
        'BEGIN { printf "%.0f%%", 100 * r / (c * 1000 / ms) }')
    label=$rows
    [ "$timed_rows" = "$rows" ] || label="$rows*"
    printf '%-8s  %-7s  %-11s  %-14s  %9s  %8s  %5s MiB\n' \
        "$label" "$latency" "$conc" "$impl" "$rate" "$ideal" "$(mib "$rss")"
done <"$RESULTS"
echo "* the naive pattern was timed on its first $NAIVE_MAX rows (fewer at high latency); it still loads them all"
echo
while IFS=$'\t' read -r latency conc rate; do
    echo "sandbox alone (loadgen): latency $latency, $conc in flight: $rate req/s"
done < <(sort -u "$SANDBOX_RATES")
echo
while IFS=$'\t' read -r rows latency ours naive; do
    echo "every run, $rows rows, $latency (events/s, in run order): resonance-sync $ours; naive $naive"
done <"$ALL_RUNS"

# The targets of issue 4, from the table.
echo
python3 - "$RESULTS" <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
def ms(latency):
    return float(latency[:-2]) if latency.endswith("ms") else float(latency[:-1]) * 1000
ours = {(int(r[0]), r[1]): (float(r[4]), int(r[5])) for r in rows if r[3] == "resonance-sync"}
naive = {(int(r[0]), r[1]): float(r[4]) for r in rows if r[3] == "naive"}
concurrency = int(rows[0][2])
def verdict(ok):
    return "met" if ok else "MISSED"
for (size, latency), (rate, rss) in sorted(ours.items()):
    if ms(latency) == 0 and (size, latency) in naive:
        x = rate / naive[(size, latency)]
        print(f"{size} rows, {latency}: {x:.1f}x the naive pattern (target 10x): {verdict(x >= 10)}")
    elif ms(latency) > 0:
        share = rate / (concurrency * 1000 / ms(latency))
        print(f"{size} rows, {latency}: {share:.0%} of concurrency/latency (target 80%): {verdict(share >= 0.8)}")
    print(f"{size} rows, {latency}: peak RSS {rss / 1024:.1f} MiB (target < 64 MiB): {verdict(rss < 64 * 1024)}")
sizes = sorted({size for size, _ in ours})
if len(sizes) > 1:
    small, large = sizes[0], sizes[-1]
    for latency in sorted({l for _, l in ours}, key=ms):
        if (small, latency) in ours and (large, latency) in ours:
            (r1, m1), (r2, m2) = ours[(small, latency)], ours[(large, latency)]
            print(f"{large} vs {small} rows, {latency}: peak RSS x{m2 / m1:.2f}, time per row x{r1 / r2:.2f} (targets <= 1.3): {verdict(m2 / m1 <= 1.3 and r1 / r2 <= 1.3)}")
PY
