use super::*;

fn split(url: &str) -> (String, TlsOptions) {
    split_url(url).unwrap()
}

#[test]
fn libpq_tls_parameters_are_taken_out_of_a_uri() {
    let (rest, options) = split(
        "postgres://crm:pw@db:5432/shop?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
    );
    assert_eq!(rest, "postgres://crm:pw@db:5432/shop?application_name=x");
    assert_eq!(options.mode, SslMode::VerifyFull);
    assert_eq!(
        options.root_cert,
        Some(RootCert::File(PathBuf::from("/etc/ca.pem")))
    );
    let (rest, options) = split("postgresql://db/shop?sslmode=verify-ca&sslrootcert=system");
    assert_eq!(rest, "postgresql://db/shop");
    assert_eq!(options.mode, SslMode::VerifyCa);
    assert_eq!(options.root_cert, Some(RootCert::System));
}

#[test]
fn the_default_mode_is_prefer_as_in_libpq() {
    let (rest, options) = split("postgres://db/shop");
    assert_eq!(rest, "postgres://db/shop");
    assert_eq!(options.mode, SslMode::Prefer);
    assert_eq!(options.root_cert, None);
}

#[test]
fn libpq_tls_parameters_are_taken_out_of_key_values() {
    let (rest, options) = split(
        "host=db user=crm sslmode = verify-full password='a b\\'c' sslrootcert='/my certs/ca.pem' dbname=shop",
    );
    assert_eq!(rest, "host=db user=crm password='a b\\'c' dbname=shop");
    assert_eq!(options.mode, SslMode::VerifyFull);
    assert_eq!(
        options.root_cert,
        Some(RootCert::File(PathBuf::from("/my certs/ca.pem")))
    );
    assert!(split_url("host=db sslmode").is_err());
    let error = split_url("host=db password=hunter2 2").unwrap_err();
    assert!(!error.contains('2'), "{error}");
    assert!(split_url("host='db").is_err());
}

#[test]
fn every_libpq_mode_is_known_and_others_are_refused() {
    for (text, mode, driver) in [
        ("disable", SslMode::Disable, DriverSslMode::Disable),
        ("prefer", SslMode::Prefer, DriverSslMode::Prefer),
        ("require", SslMode::Require, DriverSslMode::Require),
        ("verify-ca", SslMode::VerifyCa, DriverSslMode::Require),
        ("verify-full", SslMode::VerifyFull, DriverSslMode::Require),
    ] {
        let (_, options) = split(&format!("postgres://db/x?sslmode={text}"));
        assert_eq!(options.mode, mode);
        assert_eq!(mode.driver_mode(), driver);
    }
    let error = split_url("postgres://db/x?sslmode=verify_full").unwrap_err();
    assert!(error.contains("'verify_full' is not one of"), "{error}");
    assert!(split_url("postgres://db/x?sslrootcert=").is_err());
}

#[test]
fn a_missing_or_empty_root_certificate_file_is_an_error_not_a_fallback() {
    let options = TlsOptions {
        mode: SslMode::VerifyFull,
        root_cert: Some(RootCert::File(PathBuf::from("/nonexistent/ca.pem"))),
    };
    let error = connector(&options).err().unwrap();
    assert!(error.contains("sslrootcert /nonexistent/ca.pem"), "{error}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").unwrap();
    let options = TlsOptions {
        mode: SslMode::VerifyCa,
        root_cert: Some(RootCert::File(empty)),
    };
    assert!(connector(&options)
        .err()
        .unwrap()
        .contains("no PEM certificate"));
}
