//! Every column type a CRM uses has one defined JSON value, checked on the raw request body
//! against the real server: exact numbers, `money` under any `lc_monetary`, zones for
//! timestamps without one, `NaN` rejected, unsupported types refused at `check`.

use resonance_sync::config::{self, Config, Overrides};

use crate::cluster::{ClusterOptions, PrivateCluster};
use crate::harness::*;

/// The config of the harness with `[database]` lines added (e.g. `timestamp_zone`).
fn config_with(db_url: &str, endpoint: &str, database_extra: &str, mappings: &str) -> Config {
    let text = config_text(db_url, endpoint, "", mappings).replacen(
        "claim_lease = \"5s\"",
        &format!("claim_lease = \"5s\"\n{database_extra}"),
        1,
    );
    let overrides = Overrides {
        api_key: Some(API_KEY.to_string()),
        ..Overrides::default()
    };
    config::parse(&text, &overrides).unwrap_or_else(|p| panic!("invalid test config: {p:#?}"))
}

/// A mapping over `table` (key `id`, email `email`, flag `synced`) sending `fields` as
/// metadata, each field named like its column; `extra` adds mapping keys.
fn mapping(table: &str, fields: &[&str], extra: &str) -> String {
    let metadata: Vec<String> = fields.iter().map(|f| format!("{f} = \"{f}\"")).collect();
    format!(
        r#"
[[mapping]]
name = "orders"
event_type = "purchase"
interval = "200ms"
key = "id"
email = "email"
query = "SELECT * FROM {table} WHERE NOT synced"
mark_synced = "UPDATE {table} SET synced = true WHERE id = ANY($1)"
{extra}
[mapping.metadata]
{}
"#,
        metadata.join("\n")
    )
}

/// `metadata.<field>` of one request as exact JSON text.
fn field(seen: &Seen, name: &str) -> String {
    seen.json["metadata"]
        .get(name)
        .unwrap_or_else(|| panic!("no metadata.{name} in {}", seen.text()))
        .to_string()
}

const EVERY_TYPE: &str = r#"
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE DOMAIN positive_amount AS numeric(12,2) CHECK (VALUE > 0);
CREATE TABLE everything (
  id bigint PRIMARY KEY, email text NOT NULL,
  small smallint, normal integer, big bigint,
  amount numeric(12,2), precise numeric, huge numeric,
  ratio real, score double precision, price money, prices money[],
  name text, code varchar(10), padded char(6), flag boolean,
  day date, at_tz timestamptz, at_local timestamp, at_time time, id_uuid uuid,
  doc json, docb jsonb, tags text[], amounts numeric[], grid integer[], pads char(3)[],
  blob bytea, feeling mood, positive positive_amount, nothing text,
  synced boolean NOT NULL DEFAULT false);
INSERT INTO everything VALUES (
  1, 'ana.lopez@example.com',
  -32768, 2147483647, 9223372036854775807,
  49.90, 0.12345678901234567890123456789012, -12345678901234567890123456789.000100,
  0.1, 0.1::float8 + 0.2::float8, 25000.00, '{1.5,-2}',
  'dån "quoted" ', 'ABC', 'ab', true,
  '2024-02-29', '2024-03-10 12:34:56.789+02', '2024-07-01 12:00:00', '13:05:09.5',
  'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
  '{"n": 1.10, "big": 12345678901234567890}', '{"b": 0.1, "a": [1, null]}',
  '{x,NULL,"y z"}', '{1.50,2}', '{{1,2},{3,4}}', '{a,bc}',
  '\x00ff10', 'happy', 12.30, NULL);
"#;

/// Each column's expected JSON, as it must appear in the body.
const EXPECTED: &[(&str, &str)] = &[
    ("small", "-32768"),
    ("normal", "2147483647"),
    ("big", "9223372036854775807"),
    ("amount", "49.90"),
    ("precise", "0.12345678901234567890123456789012"),
    ("huge", "-12345678901234567890123456789.000100"),
    ("ratio", "0.1"),
    ("score", "0.30000000000000004"),
    ("price", "25000.00"),
    ("prices", "[1.50,-2.00]"),
    ("name", r#""dån \"quoted\" ""#),
    ("code", r#""ABC""#),
    ("padded", r#""ab""#),
    ("flag", "true"),
    ("day", r#""2024-02-29""#),
    ("at_tz", r#""2024-03-10T10:34:56.789Z""#),
    ("at_local", r#""2024-07-01T12:00:00Z""#),
    ("at_time", r#""13:05:09.5""#),
    ("id_uuid", r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#),
    ("doc", r#"{"n":1.10,"big":12345678901234567890}"#),
    ("docb", r#"{"a":[1,null],"b":0.1}"#),
    ("tags", r#"["x",null,"y z"]"#),
    ("amounts", "[1.50,2]"),
    ("grid", "[[1,2],[3,4]]"),
    ("pads", r#"["a","bc"]"#),
    ("blob", r#""AP8Q""#),
    ("feeling", r#""happy""#),
    ("positive", "12.30"),
    ("nothing", "null"),
];

#[tokio::test]
async fn every_column_type_has_its_defined_json_value_in_the_request_body() {
    logs();
    let db = TestDb::new().await;
    db.exec(EVERY_TYPE).await;
    let receiver = Receiver::start().await;
    let fields: Vec<&str> = EXPECTED.iter().map(|(f, _)| *f).collect();
    let config = config(
        &db.url,
        &receiver.endpoint(),
        "",
        &mapping("everything", &fields, ""),
    );
    let reports = backfill(&config).await.expect("the backfill succeeds");
    assert_eq!(reports[0].delivered, 1);

    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    for (name, expected) in EXPECTED {
        assert_eq!(&field(&seen[0], name), expected, "metadata.{name}");
    }
    // The raw bytes, not only the parsed value: digits never went through a float.
    let body = seen[0].text();
    for raw in [
        "\"big\":9223372036854775807,",
        "\"amount\":49.90,",
        "\"score\":0.30000000000000004,",
        "\"price\":25000.00,",
    ] {
        assert!(body.contains(raw), "{raw} not in {body}");
    }
    // The text PostgreSQL itself prints for the numbers is the text that was sent.
    for column in ["amount", "precise", "huge", "big", "price::numeric"] {
        let text: String = db
            .scalar(&format!("SELECT ({column})::text FROM everything"))
            .await;
        let name = column.trim_end_matches("::numeric");
        assert_eq!(
            field(&seen[0], name),
            text,
            "{column} as PostgreSQL prints it"
        );
    }
}

#[tokio::test]
async fn timestamps_without_zone_are_read_in_timestamp_zone_as_postgresql_reads_them() {
    logs();
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE stamps (id int PRIMARY KEY, email text, at_local timestamp,
                              synced boolean NOT NULL DEFAULT false);
         INSERT INTO stamps VALUES
           (1, 'a@example.com', '2024-01-15 12:00:00'),
           (2, 'b@example.com', '2024-07-01 12:00:00.25'),
           (3, 'c@example.com', '2024-10-27 02:30:00'),   -- happens twice in Berlin
           (4, 'd@example.com', '2024-03-31 02:30:00'),   -- never happens in Berlin
           (5, 'e@example.com', '1969-07-20 20:17:40');",
    )
    .await;
    let receiver = Receiver::start().await;
    let config = config_with(
        &db.url,
        &receiver.endpoint(),
        "timestamp_zone = \"Europe/Berlin\"",
        &mapping("stamps", &["id", "at_local"], ""),
    );
    backfill(&config).await.expect("the backfill succeeds");

    let seen = receiver.seen();
    assert_eq!(seen.len(), 5);
    for s in &seen {
        let id = field(s, "id");
        // PostgreSQL's own reading of the wall-clock time in the zone, printed in UTC.
        let expected: String = db
            .scalar(&format!(
                "SELECT to_char((at_local AT TIME ZONE 'Europe/Berlin') AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS') FROM stamps WHERE id = {id}"
            ))
            .await;
        let sent = s.json["metadata"]["at_local"].as_str().unwrap().to_string();
        assert_eq!(sent[..19], expected, "row {id}: {sent}");
        assert!(sent.ends_with('Z'), "{sent}");
    }
    let by_id = |id: &str| seen.iter().find(|s| field(s, "id") == id).unwrap();
    assert_eq!(field(by_id("1"), "at_local"), "\"2024-01-15T11:00:00Z\"");
    assert_eq!(
        field(by_id("2"), "at_local"),
        "\"2024-07-01T10:00:00.250Z\""
    );
}

#[tokio::test]
async fn c6_numeric_nan_and_infinity_are_dead_lettered_never_sent_as_zero() {
    logs();
    let db = TestDb::with_orders().await;
    db.exec(
        "INSERT INTO orders (user_email, order_value, currency)
           VALUES ('nan.case@example.com', 'NaN', 'USD');
         CREATE TABLE orders_unbounded (LIKE orders INCLUDING ALL);
         ALTER TABLE orders_unbounded ALTER COLUMN order_value TYPE numeric;
         INSERT INTO orders_unbounded (id, user_email, order_value, currency) VALUES
           (10, 'inf.case@example.com', 'Infinity', 'USD'),
           (11, 'minus.inf@example.com', '-Infinity', 'USD');
         INSERT INTO orders (user_email, order_value, currency)
           VALUES ('normal.after.nan@example.com', 25.00, 'USD');",
    )
    .await;
    let receiver = Receiver::start().await;
    let mappings = orders_mapping("orders")
        + &orders_mapping("orders_unbounded").replace("name = \"orders\"", "name = \"wide\"");
    let config = config(&db.url, &receiver.endpoint(), "", &mappings);
    let result = backfill(&config).await;
    assert!(
        result.is_err(),
        "rejected rows make the backfill report them"
    );

    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "only the normal row is sent: {seen:?}");
    assert_eq!(seen[0].email(), "normal.after.nan@example.com");
    assert!(seen[0].text().contains("\"order_value\":25.00"));
    assert_eq!(db.synced_ids().await, vec![2]);
    let dead: Vec<String> = db
        .column(
            "SELECT mapping || ':' || row_key || ':' || reason FROM resonance_sync.deliveries \
             WHERE dead_at IS NOT NULL ORDER BY 1",
        )
        .await;
    assert_eq!(
        dead,
        [
            "orders:1:invalid_order_value",
            "wide:10:invalid_order_value",
            "wide:11:invalid_order_value"
        ]
    );
    let unsynced: i64 = db
        .scalar("SELECT count(*) FROM orders_unbounded WHERE synced_to_resonance")
        .await;
    assert_eq!(unsynced, 0);
}

#[tokio::test]
async fn an_unsupported_column_is_refused_at_check_with_its_name_and_type() {
    logs();
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE odd (id int PRIMARY KEY, email text, spot point, words tsvector,
                           span interval, synced boolean NOT NULL DEFAULT false);
         INSERT INTO odd VALUES (1, 'a@example.com', '(1,2)', 'a b', '1 day');",
    )
    .await;
    let receiver = Receiver::start().await;
    let config = config(
        &db.url,
        &receiver.endpoint(),
        "",
        &mapping("odd", &["spot", "words", "span"], ""),
    );
    let error = resonance_sync::app::check(&config)
        .await
        .expect_err("check refuses the mapping");
    assert_eq!(error.exit_code(), 2, "{error}");
    let text = error.to_string();
    for (column, ty) in [
        ("spot", "point"),
        ("words", "tsvector"),
        ("span", "interval"),
    ] {
        assert!(
            text.contains(&format!("column '{column}' has type {ty}")),
            "{column} {ty} in: {text}"
        );
    }
    assert_eq!(receiver.count(), 0);
}

#[tokio::test]
async fn amounts_in_minor_units_are_sent_in_major_units_of_their_currency() {
    logs();
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE payments (id int PRIMARY KEY, email text, amount_cents bigint,
                                currency char(3), synced boolean NOT NULL DEFAULT false);
         INSERT INTO payments VALUES
           (1, 'usd@example.com', 1999, 'USD'),
           (2, 'jpy@example.com', 1999, 'JPY'),
           (3, 'kwd@example.com', 1999, 'KWD'),
           (4, 'big@example.com', 9223372036854775807, 'EUR'),
           (5, 'neg@example.com', -5, 'usd'),
           (6, 'xyz@example.com', 1999, 'XYZ'),
           (7, 'none@example.com', 1999, NULL);",
    )
    .await;
    let receiver = Receiver::start().await;
    let config = config(
        &db.url,
        &receiver.endpoint(),
        "",
        &mapping(
            "payments",
            &["id", "amount_cents", "currency"],
            "amount_minor_units = \"amount_cents\"\ncurrency = \"currency\"",
        ),
    );
    assert!(backfill(&config).await.is_err(), "two rows are rejected");

    let sent: std::collections::BTreeMap<String, String> = receiver
        .seen()
        .iter()
        .map(|s| (field(s, "id"), field(s, "amount_cents")))
        .collect();
    let expected = [
        ("1", "19.99"),
        ("2", "1999"),
        ("3", "1.999"),
        ("4", "92233720368547758.07"),
        ("5", "-0.05"),
    ];
    let expected: std::collections::BTreeMap<String, String> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(sent, expected);
    assert_eq!(
        db.dead_letters().await,
        [
            ("6".to_string(), "unknown_currency".to_string()),
            ("7".to_string(), "unknown_currency".to_string())
        ]
    );
}

/// Makes sure a locale exists on this machine, generating it (root, Debian `locales`) when it
/// does not; a server started afterwards can use it.
fn ensure_locale(name: &str, source: &str) {
    let listed = std::process::Command::new("locale")
        .arg("-a")
        .output()
        .expect("run locale -a");
    let normalised = name.to_lowercase().replace("utf-8", "utf8");
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.to_lowercase() == normalised)
    {
        return;
    }
    let status = std::process::Command::new("localedef")
        .args(["-i", source, "-f", "UTF-8", name])
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "locale {name} is missing and could not be generated: run `localedef -i {source} \
         -f UTF-8 {name}` as root (Debian package `locales`)"
    );
}

#[tokio::test]
async fn c7_money_is_exact_whatever_the_servers_lc_monetary() {
    logs();
    // (locale, amounts as entered, the exact values expected in that locale's currency)
    let locales = [
        ("C", "999.99", "25000.00", "999.99", "25000.00"),
        ("de_DE.UTF-8", "999.99", "25000.00", "999.99", "25000.00"),
        ("ja_JP.UTF-8", "999", "25000", "999", "25000"),
        ("ar_KW.UTF-8", "999.999", "25000.5", "999.999", "25000.500"),
    ];
    for (locale, source) in [
        ("de_DE.UTF-8", "de_DE"),
        ("ja_JP.UTF-8", "ja_JP"),
        ("ar_KW.UTF-8", "ar_KW"),
    ] {
        ensure_locale(locale, source);
    }
    // A server of its own: one started before the locales were generated cannot see them.
    let cluster = PrivateCluster::start(ClusterOptions::default()).await;
    let receiver = Receiver::start().await;
    for (index, (locale, small, big, small_sent, big_sent)) in locales.iter().enumerate() {
        let name = format!("money_{index}");
        let url = cluster.create_database(&name).await;
        let client = connect(&url).await;
        client
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET lc_monetary = '{locale}';
                 SET lc_monetary = '{locale}';
                 CREATE TABLE orders_money (id bigserial PRIMARY KEY, email text,
                   amount money, currency char(3) NOT NULL,
                   synced boolean NOT NULL DEFAULT false);
                 INSERT INTO orders_money (email, amount, currency) VALUES
                   ('money.small@example.com', {small}::numeric, 'USD'),
                   ('money.big@example.com', {big}::numeric, 'USD');"
            ))
            .await
            .unwrap_or_else(|e| panic!("{locale}: {e}"));
        let before = receiver.count();
        let config = config(
            &url,
            &receiver.endpoint(),
            "",
            &mapping("orders_money", &["id", "amount"], ""),
        );
        backfill(&config).await.expect("the backfill succeeds");
        let seen = &receiver.seen()[before..];
        assert_eq!(seen.len(), 2, "{locale}");
        let amount = |email: &str| {
            let s = seen.iter().find(|s| s.email() == email).unwrap();
            field(s, "amount")
        };
        assert_eq!(amount("money.small@example.com"), *small_sent, "{locale}");
        assert_eq!(amount("money.big@example.com"), *big_sent, "{locale}");
        // The display text is what a naive parser would have misread.
        let display: String = client
            .query_one(
                "SELECT amount::text FROM orders_money ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_ne!(
            display, *big_sent,
            "{locale} prints money with symbols: {display}"
        );
    }
}

#[test]
fn amount_and_zone_keys_are_validated_with_their_names() {
    let text = |database: &str, mapping_extra: &str| {
        config_text(
            "postgres://x@127.0.0.1/db",
            "http://127.0.0.1:9/e",
            "",
            &mapping("t", &["id"], mapping_extra),
        )
        .replacen(
            "claim_lease = \"5s\"",
            &format!("claim_lease = \"5s\"\n{database}"),
            1,
        )
    };
    let problems = |text: String| config::parse(&text, &Overrides::default()).expect_err("refused");
    let found = problems(text("timestamp_zone = \"Mars/Olympus\"", ""));
    assert!(
        found
            .iter()
            .any(|p| p.contains("timestamp_zone: 'Mars/Olympus' is not an IANA")),
        "{found:?}"
    );
    let found = problems(text("", "amount_minor_units = \"cents\""));
    assert!(
        found
            .iter()
            .any(|p| p.contains("amount_minor_units needs currency")),
        "{found:?}"
    );
    let found = problems(text("", "currency = \"cur\""));
    assert!(
        found
            .iter()
            .any(|p| p.contains("currency is only used with amount_minor_units")),
        "{found:?}"
    );
    let found = problems(text("", "").replace("127.0.0.1/db", "127.0.0.1/db?sslmode=verify-fulll"));
    assert!(
        found
            .iter()
            .any(|p| p.contains("sslmode 'verify-fulll' is not one of")),
        "{found:?}"
    );
    let ok = text(
        "timestamp_zone = \"America/New_York\"",
        "amount_minor_units = \"c\"\ncurrency = \"k\"",
    );
    let parsed = config::parse(&ok, &Overrides::default()).expect("valid");
    assert_eq!(parsed.database.timestamp_zone.name(), "America/New_York");
    assert_eq!(parsed.mappings[0].timestamp_zone.name(), "America/New_York");
    assert_eq!(parsed.mappings[0].amount_minor_units.as_deref(), Some("c"));
}
