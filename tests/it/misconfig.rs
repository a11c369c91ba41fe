//! Mistakes an operator makes in a config, and what the daemon says and does about them: a
//! clear message naming the problem, the documented exit code, and no row sent in a loop.

use std::time::Duration;

use resonance_sync::app::{self, AppError};
use resonance_sync::config::{self, Overrides};

use crate::harness::*;

#[tokio::test]
async fn a_mark_synced_that_marks_nothing_dead_letters_the_row_instead_of_resending_it() {
    logs();
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[(Some("ana.lopez@example.com"), "49.90", "EUR")])
        .await;
    let receiver = Receiver::start().await;
    let mapping =
        orders_mapping("orders").replace("WHERE id = ANY($1)", "WHERE id = ANY($1) AND false");
    let config = config(&db.url, &receiver.endpoint(), "", &mapping);

    // Before the fix this backfill re-sent the row for ever: bound it.
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), backfill(&config))
        .await
        .expect("the backfill ends");
    assert!(matches!(result, Err(AppError::RowsLeft(_))), "{result:?}");
    assert_eq!(receiver.count(), 1, "the row is sent once, not in a loop");
    assert_eq!(
        db.dead_letters().await,
        vec![(ids[0].to_string(), "not_marked".to_string())]
    );
    assert!(db.synced_ids().await.is_empty(), "the row stays unsynced");

    // A later backfill leaves the parked row alone.
    let _ = backfill(&config).await;
    assert_eq!(receiver.count(), 1);
}

#[tokio::test]
async fn every_mapping_problem_is_listed_once_on_its_own_line() {
    let db = TestDb::with_orders().await;
    let receiver = Receiver::start().await;
    let broken = orders_mapping("orders")
        .replace("SELECT id, user_email", "SELECT id, id, user_email")
        .replace("name = \"orders\"", "name = \"ambiguous\"")
        + &orders_mapping("no_such_table").replace("name = \"orders\"", "name = \"missing\"");
    let config = config(&db.url, &receiver.endpoint(), "", &broken);

    let error = app::check(&config)
        .await
        .expect_err("check refuses the mappings");
    assert_eq!(error.exit_code(), 2);
    let text = error.to_string();
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert!(!lines.is_empty(), "{text}");
    for line in &lines {
        assert!(
            line.starts_with("  - mapping '"),
            "every problem is a bullet: {text}"
        );
        assert_eq!(
            lines.iter().filter(|l| l == &line).count(),
            1,
            "said once: {text}"
        );
    }
    assert!(text.contains("mapping 'ambiguous'"), "{text}");
    assert!(
        text.contains("mapping 'missing'") && text.contains("no_such_table"),
        "{text}"
    );
}

#[test]
fn a_config_type_error_names_its_line() {
    let text = config_text(
        "postgres://x@127.0.0.1/db",
        "http://127.0.0.1:1/e",
        "",
        &orders_mapping("orders"),
    )
    .replace("batch_size = 50", "batch_size = \"lots\"");
    let problems = config::parse(&text, &Overrides::default()).expect_err("refused");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("(`batch_size = \"lots\"`)"),
        "{problems:?}"
    );
    assert!(problems[0].starts_with("line "), "{problems:?}");
}

#[test]
fn an_endpoint_holding_credentials_is_refused_without_echoing_them() {
    let text = config_text(
        "postgres://x@127.0.0.1/db",
        "https://user:s3cr3t-pass@api.example.com/e",
        "",
        &orders_mapping("orders"),
    );
    let problems = config::parse(&text, &Overrides::default()).expect_err("refused");
    let joined = problems.join("\n");
    assert!(
        joined.contains("must not hold a user name or password"),
        "{joined}"
    );
    assert!(!joined.contains("s3cr3t-pass"), "{joined}");
}

#[tokio::test]
async fn dead_letter_commands_refuse_an_unknown_mapping_with_exit_2() {
    let db = TestDb::with_orders().await;
    let (_dir, path) = config_file(&db, &orders_mapping("orders"));
    for args in [
        ["list", "--mapping"],
        ["retry", "--mapping"],
        ["purge", "--mapping"],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_resonance-sync"))
            .arg("--config")
            .arg(&path)
            .arg("dead-letters")
            .args(args)
            .arg("nosuch")
            .env("RESONANCE_API_KEY", API_KEY)
            .output()
            .expect("run the binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no mapping named 'nosuch' (the config has: orders)"),
            "{stderr}"
        );
    }

    // A mapping renamed in the config left dead letters under its old name: `list` shows them,
    // so `purge` and `retry` reach them by that name.
    db.exec(
        "INSERT INTO resonance_sync.deliveries (mapping, row_key, attempts, dead_at, reason) \
         VALUES ('old_orders', '7', 1, now(), 'rejected_by_api')",
    )
    .await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_resonance-sync"))
        .arg("--config")
        .arg(&path)
        .args(["dead-letters", "purge", "--mapping", "old_orders"])
        .env("RESONANCE_API_KEY", API_KEY)
        .output()
        .expect("run the binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("1 dead letter(s) purged"), "{stdout}");
}

/// A key the query returns for several rows is never sent (see the next test): `check` names
/// it before a run finds out.
#[tokio::test]
async fn check_warns_about_keys_returned_for_several_rows() {
    let db = imports(
        "('R-1', 'a@example.com'), ('R-1', 'b@example.com'), ('R-2', 'c@example.com'), \
         ('R-3', 'd@example.com'), ('R-3', 'e@example.com'), ('R-3', 'f@example.com')",
    )
    .await;
    let (_dir, path) = config_file(&db, &imports_mapping("imports"));
    let output = check(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "warning: 2 key(s) are returned for more than one row (e.g. 'R-1', 'R-3'): such \
             rows are never sent"
        ) && stdout.contains("ref must be unique"),
        "{stdout}"
    );

    db.exec("DELETE FROM imports WHERE user_email IN ('b@example.com', 'e@example.com', 'f@example.com')")
        .await;
    let stdout = String::from_utf8_lossy(&check(&path).stdout).into_owned();
    assert!(
        stdout.contains("3 unsynced row(s)") && !stdout.contains("more than one row"),
        "{stdout}"
    );
}

/// A row whose key is NULL can be neither claimed nor marked: `check` says how many the query
/// returns, instead of leaving them unsent in silence.
#[tokio::test]
async fn check_warns_about_rows_without_a_key() {
    let db =
        imports("('A-1', 'a@example.com'), (NULL, 'b@example.com'), (NULL, 'c@example.com')").await;
    let mapping = imports_mapping("imports");
    let (_dir, path) = config_file(&db, &mapping);
    let output = check(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("mapping 'imports': 1 unsynced row(s) to deliver")
            && stdout.contains(
                "warning: 2 row(s) have no key (ref is NULL): they are never sent, marked or \
                 dead-lettered"
            ),
        "{stdout}"
    );

    // Once every row has a key, the warning goes.
    db.exec("UPDATE imports SET ref = 'A-' || user_email WHERE ref IS NULL")
        .await;
    let output = check(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("3 unsynced row(s)") && !stdout.contains("have no key"),
        "{stdout}"
    );
}

/// A query that prepares but fails when it runs (here on one row's value, not the first row's:
/// `check` runs the query whole, not only on its sample row) is named by `check`, with the
/// server's message, as a mapping problem (exit 2).
#[tokio::test]
async fn check_names_the_mapping_whose_query_fails_when_run() {
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (Some("a@example.com"), "10.00", "USD"),
            (Some("b@example.com"), "20.00", "USD"),
        ])
        .await;
    let mapping = orders_mapping("orders").replace(
        "SELECT id, user_email, order_value, currency FROM orders",
        &format!(
            "SELECT id, user_email, order_value, currency, 1 / (id - {}) AS boom FROM orders",
            ids[1]
        ),
    );
    let (_dir, path) = config_file(&db, &mapping);
    let output = check(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mapping 'orders': query: it fails when run: ")
            && stderr.contains("division by zero"),
        "{stderr}"
    );
}

/// A config file for `db` with `mappings`, in a directory of its own (kept while the handle
/// lives); the endpoint is never reached.
fn config_file(db: &TestDb, mappings: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    let text = config_text(&db.url, "http://127.0.0.1:1/e", "", mappings);
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// `resonance-sync --config <path> check`.
fn check(path: &std::path::Path) -> std::process::Output {
    command(path, "check")
}

fn command(path: &std::path::Path, command: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_resonance-sync"))
        .arg("--config")
        .arg(path)
        .arg(command)
        .env("RESONANCE_API_KEY", API_KEY)
        .output()
        .expect("run resonance-sync")
}

/// A `mark_synced` whose `$1` cannot hold every key (a text key, an integer column) would send
/// rows it can never mark, again and again: `check` refuses it, naming both types.
#[tokio::test]
async fn check_refuses_a_mark_synced_whose_parameter_cannot_hold_the_key() {
    let db = imports("('ORD-1', 'a@example.com')").await;
    db.exec("ALTER TABLE imports ADD COLUMN id bigserial").await;
    let mapping = imports_mapping("imports").replace("WHERE ref = ANY($1)", "WHERE id = ANY($1)");
    let (_dir, path) = config_file(&db, &mapping);
    let output = check(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "mapping 'imports': mark_synced: $1 is int8[] but the key column is text: some keys \
             could never be marked"
        ),
        "{stderr}"
    );
}

/// `check` tries `mark_synced` on its sample row and rolls it back. One that marks more than the
/// rows it is given (a wrong column, an OR) would hide rows never sent: refused, exit 2. One that
/// leaves the row in the query is warned about. The database is left as it was.
#[tokio::test]
async fn check_tries_mark_synced_on_one_row_and_refuses_one_that_marks_others() {
    let db =
        imports("('A-1', 'a@example.com'), ('A-2', 'b@example.com'), ('A-3', 'c@example.com')")
            .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    let with_mark = |mark: &str| {
        let mapping = imports_mapping("imports").replace(
            "mark_synced = \"UPDATE imports SET synced = true WHERE ref = ANY($1)\"",
            &format!("mark_synced = \"{mark}\""),
        );
        let text = config_text(&db.url, "http://127.0.0.1:1/e", "", &mapping);
        std::fs::write(&path, text).expect("write config");
        check(&path)
    };

    let good = with_mark("UPDATE imports SET synced = true WHERE ref = ANY($1)");
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{stdout}");
    assert!(
        stdout.contains("mark_synced takes the sample row (A-") && stdout.contains("rolled back"),
        "{stdout}"
    );

    let greedy = with_mark("UPDATE imports SET synced = true WHERE ref = ANY($1) OR true");
    let stderr = String::from_utf8_lossy(&greedy.stderr);
    assert_eq!(greedy.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mapping 'imports': mark_synced: given the one key 'A-")
            && stderr.contains("it also took 2 other row(s) out of the query"),
        "{stderr}"
    );

    // Without a WHERE, synced rows come back into the query: rows would be sent again and again.
    db.exec("INSERT INTO imports (ref, user_email, synced) VALUES ('S-1', 's@example.com', true)")
        .await;
    let swap = with_mark("UPDATE imports SET synced = (ref = ANY($1))");
    let stderr = String::from_utf8_lossy(&swap.stderr);
    assert_eq!(swap.status.code(), Some(2), "{stderr}");
    assert!(
        stderr
            .contains("changed which other rows the query returns (rows already synced came back)"),
        "{stderr}"
    );

    // A mark that fails (here a trigger refuses it) would leave every delivered row unsynced.
    db.exec(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'boom from trigger'; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON imports FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .await;
    let failing = with_mark("UPDATE imports SET synced = true WHERE ref = ANY($1)");
    let stderr = String::from_utf8_lossy(&failing.stderr);
    assert_eq!(failing.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mark_synced fails on the sample row A-")
            && stderr.contains("boom from trigger"),
        "{stderr}"
    );
    db.exec("DROP TRIGGER refuse ON imports").await;

    let idle = with_mark("UPDATE imports SET user_email = user_email WHERE ref = ANY($1)");
    let stdout = String::from_utf8_lossy(&idle.stdout);
    assert!(idle.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: mark_synced leaves the sample row (A-"),
        "{stdout}"
    );
    assert_eq!(
        db.column("SELECT ref FROM imports WHERE NOT synced ORDER BY 1")
            .await,
        ["A-1", "A-2", "A-3"],
        "every trial was rolled back"
    );
}

/// `check` reads every row of the query. Stopped meanwhile (Ctrl-C, a timeout), it must not
/// leave that statement running on the server.
#[tokio::test]
async fn a_stopped_check_does_not_leave_its_query_running_on_the_server() {
    let db = imports("('A-1', 'a@example.com'), ('A-2', 'b@example.com')").await;
    let slow = imports_mapping("imports").replace(
        "WHERE NOT synced\"",
        "WHERE NOT synced AND pg_sleep(30) IS NOT NULL\"",
    );
    let (_dir, path) = config_file(&db, &slow);
    let mut check = std::process::Command::new(env!("CARGO_BIN_EXE_resonance-sync"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env("RESONANCE_API_KEY", API_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start check");
    let running = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND state = 'active' \
                     AND query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()";
    wait_until(
        Duration::from_secs(15),
        "check reads the slow query",
        || async { db.scalar::<i64>(running).await > 0 },
    )
    .await;
    check.kill().expect("stop check");
    let _ = check.wait();
    wait_until(
        Duration::from_secs(10),
        "the server cancels the query of the stopped check",
        || async { db.scalar::<i64>(running).await == 0 },
    )
    .await;
}

/// A query that ends in LIMIT would let its first rows, once dead letters, block every other
/// row for ever: it is refused, with the reason.
#[tokio::test]
async fn a_query_that_caps_its_rows_with_limit_is_refused() {
    let db = imports("('A-1', NULL), ('A-2', 'b@example.com')").await;
    for capped in [
        "ORDER BY ref LIMIT 1",
        "FETCH FIRST 1 ROWS ONLY FOR UPDATE",
        "OFFSET 1",
    ] {
        let mapping = imports_mapping("imports").replace(
            "WHERE NOT synced\"",
            &format!("WHERE NOT synced {capped}\""),
        );
        let (_dir, path) = config_file(&db, &mapping);
        let output = check(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{capped}: {stderr}");
        assert!(
            stderr.contains("mapping 'imports': query: it ends in LIMIT (or OFFSET, FETCH FIRST)"),
            "{capped}: {stderr}"
        );
    }
}

/// A mapping whose SQL stopped working (its table was renamed) is named by `status`, which still
/// shows the others, and ends with exit 2.
#[tokio::test]
async fn status_names_a_mapping_it_cannot_read_and_still_shows_the_others() {
    let db = imports("('A-1', 'a@example.com')").await;
    db.exec("CREATE TABLE imports_too (LIKE imports)").await;
    let mappings = format!(
        "{}{}",
        imports_mapping("imports"),
        imports_mapping("renamed").replace("FROM imports", "FROM imports_too")
    );
    let (_dir, path) = config_file(&db, &mappings);
    assert!(command(&path, "status").status.success());
    db.exec("ALTER TABLE imports_too RENAME TO imports_gone")
        .await;

    let output = command(&path, "status");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stdout.contains("mapping 'imports'\n  backlog (unsynced, not dead-lettered): 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("mapping 'renamed'\n  cannot be read: ") && stdout.contains("imports_too"),
        "{stdout}"
    );
    assert!(stderr.contains("mapping 'renamed'"), "{stderr}");
}

/// A key the query returns for two rows: `mark_synced` marks by key, so sending one of them
/// would mark the other without its own 2xx. Neither is sent; the key is one dead letter with
/// reason `duplicate_key`, and the other rows go on.
#[tokio::test]
async fn a_key_returned_for_several_rows_is_dead_lettered_and_none_of_them_is_sent() {
    logs();
    let db = imports(
        "('R-1', 'first@example.com'), ('R-1', 'second@example.com'), ('R-2', 'other@example.com')",
    )
    .await;
    let mapping = imports_mapping("orders");
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", &mapping);
    let result = backfill(&config).await;
    assert!(matches!(result, Err(AppError::RowsLeft(_))), "{result:?}");
    let sent: Vec<String> = receiver.seen().iter().map(Seen::email).collect();
    assert_eq!(sent, ["other@example.com"]);
    assert_eq!(
        db.dead_letters().await,
        vec![("R-1".to_string(), "duplicate_key".to_string())]
    );
    assert_eq!(
        db.column("SELECT user_email FROM imports WHERE synced ORDER BY 1")
            .await,
        ["other@example.com"],
        "both rows of R-1 stay unsynced"
    );
}

/// A query that fails when run is not a database outage: a backfill gives that mapping up after
/// a few tries and ends with exit 3 naming it and the server's error, while the other mappings
/// are delivered. (It used to wait for the database to come back, for ever.)
#[tokio::test]
async fn a_backfill_gives_up_a_mapping_whose_query_fails_when_run_and_ends() {
    logs();
    let db = TestDb::with_orders().await;
    db.insert_orders(&[(Some("a@example.com"), "10.00", "USD")])
        .await;
    db.exec(
        "CREATE TABLE imports (id bigint PRIMARY KEY, user_email text,
                               synced boolean NOT NULL DEFAULT false);
         INSERT INTO imports (id, user_email) VALUES (1, 'b@example.com');",
    )
    .await;
    let broken = r#"
[[mapping]]
name = "broken"
event_type = "signup"
interval = "200ms"
key = "id"
email = "user_email"
query = "SELECT id, user_email, 1 / (id - id) AS boom FROM imports WHERE NOT synced"
mark_synced = "UPDATE imports SET synced = true WHERE id = ANY($1)"
"#;
    let receiver = Receiver::start().await;
    let mappings = format!("{}{broken}", orders_mapping("orders"));
    let config = config(&db.url, &receiver.endpoint(), "", &mappings);
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), backfill(&config))
        .await
        .expect("the backfill ends");
    let error = result.expect_err("the broken mapping fails the backfill");
    assert_eq!(error.exit_code(), 3, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("gave up on mapping 'broken': ") && text.contains("division by zero"),
        "{text}"
    );
    let sent: Vec<String> = receiver.seen().iter().map(Seen::email).collect();
    assert_eq!(sent, ["a@example.com"], "the other mapping is delivered");
    assert_eq!(db.synced_ids().await.len(), 1);
}

/// A database whose table `imports` (a text key `ref` that may be NULL or repeated, an email, a
/// `synced` flag) holds `values`, as `(ref, user_email)` tuples.
async fn imports(values: &str) -> TestDb {
    let db = TestDb::new().await;
    db.exec(&format!(
        "CREATE TABLE imports (ref text, user_email text, synced boolean NOT NULL DEFAULT false);
         INSERT INTO imports (ref, user_email) VALUES {values};"
    ))
    .await;
    db
}

/// A mapping `name` of the table of [`imports`], keyed by `ref`.
fn imports_mapping(name: &str) -> String {
    format!(
        r#"
[[mapping]]
name = "{name}"
event_type = "signup"
key = "ref"
email = "user_email"
query = "SELECT ref, user_email FROM imports WHERE NOT synced"
mark_synced = "UPDATE imports SET synced = true WHERE ref = ANY($1)"
"#
    )
}
