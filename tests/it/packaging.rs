//! The files that ship the daemon: the systemd unit (checked by `systemd-analyze`), the
//! Dockerfile and docker-compose.yml, and the `cargo deb` metadata. Each check reads the real
//! file and fails on a path, flag or config that would not work.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use resonance_sync::cli::Cli;
use resonance_sync::config::{self, Overrides};
use yaml_rust2::{Yaml, YamlLoader};

use crate::process::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_resonance-sync");
const UNIT: &str = "packaging/systemd/resonance-sync.service";
/// Set to 1 to run the suite on a machine without systemd-analyze (the unit is then not verified).
const NO_ANALYZE: &str = "RESONANCE_SKIP_SYSTEMD_ANALYZE";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The values of `key=` in the unit, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

fn seconds(value: &str) -> Duration {
    humantime::parse_duration(value).unwrap_or_else(|e| panic!("'{value}': {e}"))
}

/// The unit with ExecStart pointing at the binary just built, in a directory of its own.
fn unit_for_this_build(scratch: &Scratch) -> PathBuf {
    let unit = read(UNIT).replace(
        "ExecStart=/usr/bin/resonance-sync ",
        &format!("ExecStart={BIN} "),
    );
    assert!(unit.contains(&format!("ExecStart={BIN} ")));
    scratch.write("resonance-sync.service", &unit)
}

fn systemd_analyze(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("systemd-analyze").args(args).output() {
        Ok(output) => Some(output),
        Err(e) if std::env::var(NO_ANALYZE).as_deref() == Ok("1") => {
            eprintln!("systemd-analyze is not available ({e}); {NO_ANALYZE}=1 skips the check");
            None
        }
        Err(e) => panic!(
            "systemd-analyze cannot be run ({e}): install systemd (apt-get install systemd), or \
             set {NO_ANALYZE}=1 to run the suite without verifying the unit"
        ),
    }
}

#[test]
fn the_unit_file_has_what_an_operator_expects() {
    let unit = read(UNIT);
    let one = |key: &str| -> String {
        let values = unit_values(&unit, key);
        assert_eq!(values.len(), 1, "{key}= once in the unit: {values:?}");
        values[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("ProtectHome"), "yes");
    assert_eq!(
        one("LoadCredential"),
        format!("{}:/etc/resonance-sync/api-key", config::CREDENTIAL_NAME)
    );
    assert!(seconds(&one("WatchdogSec")) >= Duration::from_secs(10));
    // A stop waits for requests in flight: longer than the default request timeout.
    let example = config::parse(&read("config.example.toml"), &Overrides::default())
        .expect("the example config parses");
    assert!(seconds(&one("TimeoutStopSec")) > example.resonance.timeout * 2);

    // ExecStart is a command line the binary accepts, for `run`, with the default config path.
    let exec = one("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args[0], "/usr/bin/resonance-sync");
    let cli = Cli::try_parse_from(&args).expect("ExecStart parses");
    assert!(matches!(cli.command, resonance_sync::cli::Command::Run));
    assert_eq!(cli.config, Path::new(config::DEFAULT_CONFIG_PATH));
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let scratch = Scratch::new();
    let unit = unit_for_this_build(&scratch);
    let Some(output) = systemd_analyze(&["verify", &unit.to_string_lossy()]) else {
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-analyze verify: {stderr}");
    // verify exits 0 on unknown keys and bad values, and only prints them.
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("resonance-sync.service"))
        .collect();
    assert!(about_ours.is_empty(), "{about_ours:#?}");

    // A typo is caught, so the check above could fail.
    let broken = scratch.write(
        "resonance-sync.service",
        &std::fs::read_to_string(&unit)
            .unwrap()
            .replace("Type=notify", "Type=notfy"),
    );
    let output = systemd_analyze(&["verify", &broken.to_string_lossy()]).expect("ran before");
    assert!(String::from_utf8_lossy(&output.stderr).contains("notfy"));
}

#[test]
fn the_unit_file_is_hardened() {
    let scratch = Scratch::new();
    let unit = unit_for_this_build(&scratch);
    let path = unit.to_string_lossy();
    let Some(output) = systemd_analyze(&["security", "--offline=yes", "--no-pager", &path]) else {
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let level: f64 = text
        .lines()
        .find_map(|line| {
            let rest = line
                .split("Overall exposure level for resonance-sync.service: ")
                .nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(
        level <= 2.0,
        "exposure {level} (systemd's scale: 0 safe to 10 unsafe)"
    );
}

fn yaml(path: &str) -> Yaml {
    let docs = YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    docs.into_iter().next().expect("one document")
}

fn strings(value: &Yaml) -> Vec<String> {
    value
        .as_vec()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A service with the `<<` merge key resolved (yaml-rust2 leaves it to the reader).
fn service(compose: &Yaml, name: &str) -> yaml_rust2::yaml::Hash {
    let body = compose["services"][name]
        .as_hash()
        .unwrap_or_else(|| panic!("service {name}"))
        .clone();
    let mut merged = body
        .get(&Yaml::String("<<".into()))
        .and_then(Yaml::as_hash)
        .cloned()
        .unwrap_or_default();
    for (key, value) in body {
        if key.as_str() != Some("<<") {
            merged.insert(key, value);
        }
    }
    merged
}

fn get<'a>(service: &'a yaml_rust2::yaml::Hash, key: &str) -> &'a Yaml {
    service
        .get(&Yaml::String(key.into()))
        .unwrap_or(&Yaml::BadValue)
}

#[test]
fn docker_compose_brings_up_postgres_with_chinook_the_sandbox_and_the_daemon() {
    let compose = yaml("docker-compose.yml");
    let names: Vec<&str> = compose["services"]
        .as_hash()
        .expect("services")
        .keys()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(names, ["postgres", "sandbox", "daemon"]);

    // Every bind mount's host path exists.
    for name in &names {
        let service = service(&compose, name);
        for volume in strings(get(&service, "volumes")) {
            let host = volume.split(':').next().unwrap();
            assert!(host.starts_with("./"), "{name}: {volume}");
            assert!(root().join(host).exists(), "{name}: {host} is missing");
        }
    }
    let postgres = service(&compose, "postgres");
    assert!(get(&postgres, "image")
        .as_str()
        .unwrap()
        .starts_with("postgres:"));
    assert!(root().join("docker/initdb/10-chinook.sh").exists());

    // The sandbox and the daemon are built from the Dockerfile and run commands the CLI takes.
    for name in ["sandbox", "daemon"] {
        let service = service(&compose, name);
        assert_eq!(get(&service, "build").as_str(), Some("."), "{name}");
        let mut args = vec!["resonance-sync".to_string()];
        args.extend(strings(get(&service, "command")));
        Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{name}: {args:?}: {e}"));
    }

    // The daemon's config, with the environment compose gives it, is valid.
    let daemon = service(&compose, "daemon");
    let env = get(&daemon, "environment");
    let overrides = Overrides {
        database_url: env["DATABASE_URL"].as_str().map(str::to_string),
        api_key: env["RESONANCE_API_KEY"].as_str().map(str::to_string),
        ..Overrides::default()
    };
    let config = config::parse(&read("docker/config.toml"), &overrides)
        .unwrap_or_else(|problems| panic!("docker/config.toml: {problems:#?}"));
    assert_eq!(config.resonance.endpoint.host_str(), Some("sandbox"));
    assert!(config.database.url.expose().contains("@postgres:5432/"));
    let metrics = config.metrics.expect("[metrics] in the demo");
    assert!(strings(get(&daemon, "ports"))
        .iter()
        .any(|p| p.ends_with(&format!(":{}", metrics.listen.port()))));
    let sandbox = service(&compose, "sandbox");
    assert_eq!(
        get(&sandbox, "environment")["RESONANCE_API_KEY"].as_str(),
        env["RESONANCE_API_KEY"].as_str(),
        "the daemon sends the key the sandbox expects"
    );
    let depends = get(&daemon, "depends_on");
    assert_eq!(
        depends["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
}

#[test]
fn docker_compose_config_accepts_the_file_where_a_client_is_installed() {
    // `docker-compose config` (Debian's docker-compose) validates against the Compose schema
    // without an engine. Machines without it rely on the structural test above.
    let output = match Command::new("docker-compose")
        .args(["config", "-q"])
        .current_dir(root())
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            eprintln!("docker-compose is not installed ({e}); the schema check did not run");
            return;
        }
    };
    assert!(
        output.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_as_non_root_in_another() {
    let dockerfile = read("Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].ends_with(" AS build"));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    // What the build copies from the context exists and is not excluded by .dockerignore.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(root().join(source).exists(), "{line}");
            assert!(
                !ignored.iter().any(|i| source.starts_with(i.as_str())),
                "{line}"
            );
        }
    }
}

#[test]
fn the_deb_metadata_packages_the_binary_the_unit_and_the_example_config() {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets: Vec<(String, String, String)> = deb["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|asset| {
            let parts: Vec<String> = asset
                .as_array()
                .expect("[source, destination, mode]")
                .iter()
                .map(|p| p.as_str().expect("a string").to_string())
                .collect();
            assert_eq!(parts.len(), 3, "{parts:?}");
            (parts[0].clone(), parts[1].clone(), parts[2].clone())
        })
        .collect();
    for (source, _, mode) in &assets {
        assert!(u32::from_str_radix(mode, 8).is_ok(), "{mode}");
        if source == "target/release/resonance-sync" {
            continue; // built by `cargo deb`
        }
        assert!(root().join(source).is_file(), "{source} is missing");
    }
    let installs = |source: &str, destination: &str| {
        assets
            .iter()
            .any(|(s, d, _)| s == source && d == destination)
    };
    assert!(installs("target/release/resonance-sync", "usr/bin/"));
    assert!(installs(UNIT, "lib/systemd/system/resonance-sync.service"));
    assert!(installs(
        "config.example.toml",
        &config::DEFAULT_CONFIG_PATH[1..]
    ));
    assert!(deb["maintainer"].as_str().is_some());
}
