use super::*;

const MINIMAL: &str = r#"
[database]
url = "postgres://postgres@127.0.0.1/crm"
[resonance]
brand_id = "brand_test_01"
[[mapping]]
name = "orders"
event_type = "purchase"
key = "id"
email = "customer_email"
query = "SELECT id, customer_email FROM orders WHERE NOT synced"
mark_synced = "UPDATE orders SET synced = true WHERE id = ANY($1)"
"#;

fn parse_ok(text: &str) -> Config {
    match parse(text, &Overrides::default()) {
        Ok(config) => config,
        Err(problems) => panic!("expected a valid config, got {problems:#?}"),
    }
}

fn problems(text: &str) -> Vec<String> {
    parse(text, &Overrides::default()).expect_err("expected problems")
}

#[test]
fn minimal_config_gets_defaults() {
    let config = parse_ok(MINIMAL);
    assert_eq!(config.resonance.endpoint.as_str(), DEFAULT_ENDPOINT);
    assert_eq!(config.resonance.concurrency, 16);
    assert_eq!(config.resonance.timeout, Duration::from_secs(10));
    assert_eq!(config.resonance.backfill_retry.max_attempts, 5);
    assert_eq!(config.resonance.run_retry.max_attempts, 8);
    let mapping = &config.mappings[0];
    assert_eq!(mapping.interval, Duration::from_secs(30));
    assert_eq!(mapping.batch_size, 500);
    assert_eq!(mapping.metadata, None);
}

#[test]
fn the_example_config_is_valid() {
    let text = include_str!("../config.example.toml");
    parse_ok(text);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[database]
url = "postgres://x@127.0.0.1/crm"
colour = "blue"
[resonance]
brand_id = "b"
timeout = "ten seconds"
[[mapping]]
name = "orders"
event_type = "purchase"
key = "id"
email = "e"
interval = "soon"
query = "SELECT 1"
mark_synced = "UPDATE t SET s = true"
[[mapping]]
name = "signups"
"#;
    // Unknown keys are reported first, alone, since the rest may depend on them.
    let found = problems(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].contains("[database]: unknown key 'colour'"),
        "{found:#?}"
    );

    let found = problems(&text.replace("colour = \"blue\"\n", ""));
    let joined = found.join("\n");
    assert!(
        joined.contains("[resonance] timeout: 'ten seconds' is not a duration"),
        "{joined}"
    );
    assert!(
        joined.contains("mapping 'orders': interval: 'soon' is not a duration"),
        "{joined}"
    );
    assert!(
        joined.contains("mapping 'orders': mark_synced must use $1"),
        "{joined}"
    );
    assert!(
        joined.contains("mapping 'signups': 'event_type' is required"),
        "{joined}"
    );
    assert!(
        joined.contains("mapping 'signups': 'query' is required"),
        "{joined}"
    );
}

#[test]
fn unknown_keys_in_a_mapping_name_the_mapping() {
    let text = MINIMAL.replace("key = \"id\"", "key = \"id\"\nemial = \"x\"");
    let found = problems(&text);
    assert!(
        found[0].starts_with("mapping 'orders': unknown key 'emial'"),
        "{found:#?}"
    );
}

#[test]
fn environment_overrides_the_file() {
    let overrides = Overrides {
        database_url: Some("postgres://other@127.0.0.1/other".into()),
        brand_id: Some("brand_env".into()),
        endpoint: None,
        api_key: Some("sk_test_123".into()),
        credentials_directory: None,
    };
    let config = parse(MINIMAL, &overrides).unwrap();
    assert_eq!(
        config.database.url.expose(),
        "postgres://other@127.0.0.1/other"
    );
    assert_eq!(config.resonance.brand_id, "brand_env");
    assert_eq!(
        config.resonance.api_key.as_ref().map(Secret::expose),
        Some("sk_test_123")
    );
}

#[test]
fn plain_http_is_refused_unless_loopback_or_allowed() {
    let remote = MINIMAL.replace(
        "[resonance]",
        "[resonance]\nendpoint = \"http://api.example.com/e\"",
    );
    let found = problems(&remote);
    assert!(
        found[0].contains("plain http to a non-loopback host"),
        "{found:#?}"
    );
    let allowed = remote.replace("[resonance]", "[resonance]\nallow_insecure_http = true");
    parse_ok(&allowed);
    let loopback = MINIMAL.replace(
        "[resonance]",
        "[resonance]\nendpoint = \"http://127.0.0.1:8080/e\"",
    );
    parse_ok(&loopback);
}

#[test]
fn retry_policies_follow_the_keys_set() {
    let config = parse_ok(&MINIMAL.replace(
        "[resonance]",
        "[resonance]\nmax_attempts = 3\nbackoff_initial = \"2s\"",
    ));
    assert_eq!(config.resonance.run_retry, config.resonance.backfill_retry);
    assert_eq!(config.resonance.run_retry.max_attempts, 3);
    let config = parse_ok(&MINIMAL.replace(
        "[resonance]",
        "[resonance]\nretry_schedule = [\"1s\", \"1m\"]",
    ));
    assert_eq!(config.resonance.run_retry.max_attempts, 3);
    assert_eq!(
        config.resonance.run_retry.delay_after(2),
        Duration::from_secs(60)
    );
}

#[test]
fn an_empty_retry_schedule_is_refused() {
    let found = problems(&MINIMAL.replace("[resonance]", "[resonance]\nretry_schedule = []"));
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("[resonance] retry_schedule is empty: list at least one wait")),
        "{found:#?}"
    );
}

#[test]
fn an_api_key_that_cannot_go_in_a_header_is_refused_without_showing_it() {
    for key in [
        "sk_live_ABC\nDEF",
        "sk_live_ABC\u{7f}",
        "sk_live_ABC\u{1b}[0m",
    ] {
        let overrides = Overrides {
            api_key: Some(key.to_string()),
            ..Overrides::default()
        };
        let found = parse(MINIMAL, &overrides).expect_err("a bad key is refused");
        let text = found.join("\n");
        assert!(
            text.contains("the API key holds characters that cannot go in an HTTP header"),
            "{text}"
        );
        assert!(!text.contains("sk_live_ABC"), "{text}");
    }
}

#[test]
fn metadata_keeps_file_order() {
    let text = MINIMAL.to_string() + "[mapping.metadata]\norder_id = \"id\"\norder_value = \"total\"\ncurrency = \"currency\"\n";
    let config = parse_ok(&text);
    let fields: Vec<&str> = config.mappings[0]
        .metadata
        .as_ref()
        .unwrap()
        .iter()
        .map(|(f, _)| f.as_str())
        .collect();
    assert_eq!(fields, vec!["order_id", "order_value", "currency"]);
}

#[test]
fn api_key_comes_from_a_file_or_a_credential() {
    let dir = std::env::temp_dir().join(format!("rs-cred-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CREDENTIAL_NAME), "sk_from_credential\n").unwrap();
    let overrides = Overrides {
        credentials_directory: Some(dir.clone()),
        ..Overrides::default()
    };
    let config = parse(MINIMAL, &overrides).unwrap();
    assert_eq!(
        config.resonance.api_key.unwrap().expose(),
        "sk_from_credential"
    );
    let missing = MINIMAL.replace(
        "[resonance]",
        "[resonance]\napi_key_file = \"/nonexistent/key\"",
    );
    let found = problems(&missing);
    assert!(
        found[0].contains("cannot read /nonexistent/key"),
        "{found:#?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn type_errors_say_what_to_write_not_which_rust_type() {
    let cases = [
        ("batch_size = -5", "expected a whole number, 0 or more"),
        ("batch_size = 1.5", "expected a whole number, 0 or more"),
        (
            "interval = 5",
            "expected a string in quotes (durations too: \"30s\")",
        ),
    ];
    for (line, wanted) in cases {
        let text = MINIMAL.replace("name = \"orders\"", &format!("name = \"orders\"\n{line}"));
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{line}: {found:?}");
        assert!(
            found[0].contains(&format!("(`{line}`)")) && found[0].contains(wanted),
            "{line}: {}",
            found[0]
        );
        assert!(!found[0].contains("usize"), "{}", found[0]);
    }
    let pool = MINIMAL.replace("[resonance]", "pool_size = \"eight\"\n[resonance]");
    assert!(
        problems(&pool)[0]
            .ends_with("invalid type: string \"eight\", expected a whole number, 0 or more"),
        "{:?}",
        problems(&pool)
    );
}

/// `MINIMAL` with `line` added at the start of `section` (`[database]`, `[resonance]`, or the
/// mapping, by its `name` line).
fn with_line(section: &str, line: &str) -> String {
    let anchor = match section {
        "mapping" => "name = \"orders\"",
        other => other,
    };
    MINIMAL.replacen(anchor, &format!("{anchor}\n{line}"), 1)
}

#[test]
fn durations_outside_their_range_are_refused_naming_the_key_and_the_range() {
    let cases = [
        (
            "[database]",
            "claim_lease = \"100000000y\"",
            "[database] claim_lease: '100000000y' is out of range (2s to 24h)",
        ),
        (
            "[database]",
            "claim_lease = \"1s\"",
            "[database] claim_lease: '1s' is out of range (2s to 24h)",
        ),
        (
            "[database]",
            "connect_timeout = \"0s\"",
            "[database] connect_timeout: '0s' is out of range (100ms to 1h)",
        ),
        (
            "[resonance]",
            "timeout = \"0s\"",
            "[resonance] timeout: '0s' is out of range (100ms to 1h)",
        ),
        (
            "[resonance]",
            "timeout = \"2h\"",
            "[resonance] timeout: '2h' is out of range (100ms to 1h)",
        ),
        (
            "[resonance]",
            "connect_timeout = \"0s\"",
            "[resonance] connect_timeout: '0s' is out of range (100ms to 1h)",
        ),
        (
            "[resonance]",
            "backoff_initial = \"0s\"",
            "[resonance] backoff_initial: '0s' is out of range (50ms to 30 days)",
        ),
        (
            "[resonance]",
            "backoff_max = \"0s\"",
            "[resonance] backoff_max: '0s' is out of range (50ms to 30 days)",
        ),
        (
            "[resonance]",
            "backoff_max = \"31days\"",
            "[resonance] backoff_max: '31days' is out of range (50ms to 30 days)",
        ),
        (
            "[resonance]",
            "retry_schedule = [\"5s\", \"100000000y\"]",
            "[resonance] retry_schedule[1]: '100000000y' is out of range (50ms to 30 days)",
        ),
        (
            "[resonance]",
            "retry_schedule = [\"0s\"]",
            "[resonance] retry_schedule[0]: '0s' is out of range (50ms to 30 days)",
        ),
        (
            "[resonance]",
            "retry_after_max = \"0s\"",
            "[resonance] retry_after_max: '0s' is out of range (50ms to 30 days)",
        ),
        (
            "[resonance]",
            "retry_after_max = \"1000y\"",
            "[resonance] retry_after_max: '1000y' is out of range (50ms to 30 days)",
        ),
        (
            "mapping",
            "interval = \"0s\"",
            "mapping 'orders': interval: '0s' is out of range (100ms to 24h)",
        ),
        (
            "mapping",
            "interval = \"25h\"",
            "mapping 'orders': interval: '25h' is out of range (100ms to 24h)",
        ),
    ];
    for (section, line, wanted) in cases {
        let found = problems(&with_line(section, line));
        assert_eq!(found, vec![wanted.to_string()], "{line}");
    }
}

#[test]
fn durations_at_the_ends_of_their_range_are_accepted() {
    let config = parse_ok(&with_line(
        "[database]",
        "claim_lease = \"24h\"\nconnect_timeout = \"100ms\"",
    ));
    assert_eq!(config.database.claim_lease, Duration::from_secs(24 * 3600));
    let config = parse_ok(&with_line(
        "[resonance]",
        "timeout = \"1h\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"30days\"\nretry_schedule = [\"50ms\", \"30days\"]",
    ));
    assert_eq!(config.resonance.timeout, Duration::from_secs(3600));
    let config = parse_ok(&with_line("mapping", "interval = \"24h\""));
    assert_eq!(config.mappings[0].interval, Duration::from_secs(24 * 3600));
}

#[test]
fn backoff_max_may_not_be_shorter_than_backoff_initial() {
    let found = problems(&with_line(
        "[resonance]",
        "backoff_initial = \"10s\"\nbackoff_max = \"5s\"",
    ));
    assert_eq!(
        found,
        vec!["[resonance] backoff_initial (10s) is longer than backoff_max (5s)".to_string()]
    );
}

#[test]
fn a_notify_channel_longer_than_postgresql_allows_is_refused() {
    let longest = "c".repeat(63);
    let config = parse_ok(&with_line(
        "mapping",
        &format!("notify_channel = \"{longest}\""),
    ));
    assert_eq!(
        config.mappings[0].notify_channel.as_deref(),
        Some(&*longest)
    );

    let found = problems(&with_line(
        "mapping",
        &format!("notify_channel = \"{}\"", "c".repeat(64)),
    ));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with(
            "mapping 'orders': notify_channel is 64 bytes long; PostgreSQL channel names are at \
             most 63 bytes"
        ),
        "{found:#?}"
    );
    // Bytes, not characters: 32 two-byte letters are 64 bytes.
    let found = problems(&with_line(
        "mapping",
        &format!("notify_channel = \"{}\"", "é".repeat(32)),
    ));
    assert!(found[0].contains("is 64 bytes long"), "{found:#?}");
    let found = problems(&with_line("mapping", "notify_channel = \"\""));
    assert!(
        found[0].starts_with("mapping 'orders': notify_channel is empty"),
        "{found:#?}"
    );
}

/// `MINIMAL` without its `[database]` section, for texts that write it differently.
fn without_database() -> String {
    MINIMAL.replace(
        "[database]\nurl = \"postgres://postgres@127.0.0.1/crm\"\n",
        "",
    )
}

#[test]
fn type_errors_of_sections_and_lists_say_what_to_write() {
    let top = |line: &str| format!("{line}\n{}", without_database());
    let before_mappings = |line: &str| {
        let head = MINIMAL.split("[[mapping]]").next().unwrap();
        format!("{line}\n{head}")
    };
    let cases = [
        (
            with_line("[resonance]", "max_attempts = -3"),
            "max_attempts = -3",
            "invalid value: integer `-3`, expected a whole number, 0 to 4294967295",
        ),
        (
            top("database = \"x\""),
            "database = \"x\"",
            "invalid type: string \"x\", expected a table: [database]",
        ),
        (
            before_mappings("mapping = [1]"),
            "mapping = [1]",
            "invalid type: integer `1`, expected a table: a [[mapping]] section",
        ),
        (
            with_line("[resonance]", "retry_schedule = \"5s\""),
            "retry_schedule = \"5s\"",
            "invalid type: string \"5s\", expected a list in brackets, like [\"5s\", \"5m\"]",
        ),
        (
            with_line("[resonance]", "allow_insecure_http = \"yes\""),
            "allow_insecure_http = \"yes\"",
            "invalid type: string \"yes\", expected true or false",
        ),
        (
            with_line("mapping", "metadata = [1]"),
            "metadata = [1]",
            "invalid type: list, expected a table, like [mapping.metadata] or { field = \"column\" }",
        ),
    ];
    for (text, line, wanted) in cases {
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].contains(&format!("(`{line}`): {wanted}")) && found[0].ends_with(wanted),
            "{line}: {}",
            found[0]
        );
    }
}

#[test]
fn a_section_with_the_wrong_number_of_brackets_says_how_many() {
    let found = problems(&MINIMAL.replace("[[mapping]]", "[mapping]"));
    assert_eq!(
        found,
        vec!["[mapping] needs two brackets: write [[mapping]], once before each mapping"]
    );
    let found = problems(&MINIMAL.replace("[database]", "[[database]]"));
    assert_eq!(
        found,
        vec![
            "[[database]] has two brackets, which make a list of sections: write [database], once"
        ]
    );
}

#[test]
fn no_type_error_names_a_rust_type() {
    let texts = [
        with_line("[resonance]", "max_attempts = -3"),
        with_line("[resonance]", "concurrency = -1"),
        format!("database = \"x\"\n{}", without_database()),
        format!("resonance = 5\n{MINIMAL}")
            .replace("[resonance]\nbrand_id = \"brand_test_01\"\n", ""),
        format!("metrics = 3\n{MINIMAL}"),
        format!(
            "mapping = [1]\n{}",
            MINIMAL.split("[[mapping]]").next().unwrap()
        ),
        MINIMAL.replace("[[mapping]]", "[mapping]"),
        format!(
            "mapping = {{ name = \"x\" }}\n{}",
            MINIMAL.split("[[mapping]]").next().unwrap()
        ),
        with_line("mapping", "metadata = 5"),
        with_line("[resonance]", "retry_schedule = [5]"),
    ];
    for text in texts {
        let found = problems(&text).join("\n");
        assert!(!found.contains("unknown key"), "{found}");
        for rust in [
            "Raw", "struct", "usize", "u32", "sequence", "map,", "boolean",
        ] {
            assert!(!found.contains(rust), "{rust} in: {found}");
        }
    }
}

#[test]
fn an_api_key_pasted_into_api_key_file_is_not_shown() {
    let found = problems(&with_line(
        "[resonance]",
        "api_key_file = \"sk_inline_SECRET\"",
    ))
    .join("\n");
    assert!(
        found.starts_with("[resonance] api_key_file: the file it names cannot be read"),
        "{found}"
    );
    assert!(
        found.contains("The key belongs in that file or in RESONANCE_API_KEY, never in the config"),
        "{found}"
    );
    assert!(!found.contains("sk_inline_SECRET"), "{found}");
    assert!(!found.contains("SECRET"), "{found}");
}

#[test]
fn an_api_key_file_that_looks_like_a_path_is_named() {
    for path in ["/nonexistent/key", "api-key.txt"] {
        let found = problems(&with_line(
            "[resonance]",
            &format!("api_key_file = \"{path}\""),
        ));
        assert!(
            found[0].starts_with(&format!("[resonance] api_key_file: cannot read {path}: ")),
            "{found:#?}"
        );
    }
}

#[test]
fn a_connection_string_the_driver_would_refuse_is_a_config_problem_that_hides_the_password() {
    let cases = [
        (
            "postgres://crm:hunter2@127.0.0.1:5432/crm?port=5999",
            "it gives 2 ports for 1 host(s)",
        ),
        (
            "postgres://crm:hunter2@127.0.0.1:99999/crm",
            "invalid value for option `port` (a port is a number from 1 to 65535)",
        ),
        (
            "postgres://crm:hunter2@127.0.0.1/crm?connect_timeout=abc",
            "invalid value for option `connect_timeout` (a whole number of seconds",
        ),
        ("postgres://crm:hunter2@/crm", "it names no host"),
        (
            "host=127.0.0.1 password='hunter2 x' colour=blue",
            "unknown option `colour`",
        ),
    ];
    for (url, wanted) in cases {
        let overrides = Overrides {
            database_url: Some(url.to_string()),
            ..Overrides::default()
        };
        let found = parse(MINIMAL, &overrides).expect_err(url);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("DATABASE_URL is not a valid connection string: ")
                && found[0].contains(wanted),
            "{url}: {}",
            found[0]
        );
        assert!(!found[0].contains("hunter2"), "{}", found[0]);
    }
    let in_file = MINIMAL.replace(
        "postgres://postgres@127.0.0.1/crm",
        "postgres://crm:hunter2@127.0.0.1:99999/crm",
    );
    let found = problems(&in_file);
    assert!(
        found[0].starts_with("[database] url is not a valid connection string: "),
        "{found:#?}"
    );
    assert!(!found[0].contains("hunter2"), "{found:#?}");
}
