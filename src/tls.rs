//! TLS to PostgreSQL with libpq's URL parameters, on rustls.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and, on its own, never verifies a
//! certificate. libpq also has `verify-ca` and `verify-full`, and `sslrootcert=PATH`. This
//! module takes those two parameters out of the URL before tokio-postgres parses it and builds
//! the verifier each mode asks for, as libpq does: `require` encrypts without verifying unless
//! a root certificate is given, `verify-ca` checks the chain but not the host name,
//! `verify-full` checks both. It never weakens a mode: an unreadable `sslrootcert` is an
//! error, not a fallback.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` (`allow` is not supported: it would try plain text first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// `sslrootcert=PATH`: the PEM certificates in that file, only.
    File(PathBuf),
    /// `sslrootcert=system`, or a verifying mode without `sslrootcert`: the system's roots.
    System,
}

/// The TLS settings of a database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: SslMode,
    /// `None` when the URL names no root certificate.
    pub root_cert: Option<RootCert>,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode '{other}' is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                ))
            }
        })
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether to insist on it.
    pub fn driver_mode(self) -> DriverSslMode {
        match self {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
        }
    }
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL or a `key=value` string;
/// returns the rest for tokio-postgres, and the TLS options (libpq's default mode: `prefer`).
pub fn split_url(url: &str) -> Result<(String, TlsOptions), String> {
    let (rest, params) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_uri(url)?
    } else {
        split_key_values(url)?
    };
    let mut options = TlsOptions {
        mode: SslMode::Prefer,
        root_cert: None,
    };
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => options.mode = SslMode::parse(&value)?,
            _ if value.is_empty() => return Err("sslrootcert is empty".to_string()),
            _ if value == "system" => options.root_cert = Some(RootCert::System),
            _ => options.root_cert = Some(RootCert::File(PathBuf::from(value))),
        }
    }
    Ok((rest, options))
}

const TLS_KEYS: [&str; 2] = ["sslmode", "sslrootcert"];

/// The query string of a URI, percent-decoded, without the TLS parameters.
fn split_uri(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8()
                .map(|t| t.into_owned())
                .map_err(|_| format!("the URL parameter {key} is not valid UTF-8"))
        };
        let key = decode(key)?;
        if TLS_KEYS.contains(&key.as_str()) {
            taken.push((key, decode(value)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((rest, taken))
}

/// A libpq `key=value` string (values may be quoted with `'` and escaped with `\\`) without
/// the TLS parameters, and those parameters, unquoted.
fn split_key_values(text: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Never quote the text: an unquoted password with a space would be shown.
            return Err(
                "a word in the connection string has no '=' after it (quote values \
                        that hold spaces)"
                    .to_string(),
            );
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut closed = !quoted;
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                c if c.is_whitespace() && !quoted => break,
                c => value.push(c),
            }
        }
        if !closed {
            return Err("a quoted value in the connection string has no closing quote".to_string());
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        if TLS_KEYS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            kept.push(text[start..end].trim());
        }
    }
    Ok((kept.join(" "), taken))
}

/// The tokio-postgres connector for these options.
pub fn connector(options: &TlsOptions) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (options.mode, &options.root_cert) {
        (SslMode::Disable | SslMode::Prefer | SslMode::Require, None) => {
            Arc::new(Unverified(provider.clone()))
        }
        (mode, root) => {
            let root = root.clone().unwrap_or(RootCert::System);
            let roots = load_roots(&root)?;
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("cannot use the root certificates: {e}"))?;
            Arc::new(Verified {
                inner,
                check_name: mode == SslMode::VerifyFull,
                roots: match root {
                    RootCert::File(path) => format!("sslrootcert {}", path.display()),
                    RootCert::System => "the system's root certificates".to_string(),
                },
            })
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            let shown = path.display();
            let pem = std::fs::read(path).map_err(|e| format!("sslrootcert {shown}: {e}"))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("sslrootcert {shown}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {shown}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert {shown}: no PEM certificate in it"));
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no system root certificates found: install ca-certificates, or \
                            set sslrootcert=PATH in the database URL"
                        .to_string(),
                );
            }
        }
    }
    Ok(roots)
}

/// `prefer` and `require` without a root certificate: encrypted, but anyone's certificate is
/// accepted (libpq does the same). Handshake signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (chain only) and `verify-full` (chain and host name), with refusals that say
/// what was wrong.
#[derive(Debug)]
struct Verified {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
    roots: String,
}

/// A refused server certificate, in words.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(text: String) -> rustls::Error {
    rustls::Error::Other(rustls::OtherError(Arc::new(Refused(text))))
}

/// The host names a certificate is valid for, as written: webpki gives them in Rust's debug
/// form (`DnsName("localhost")`, `IpAddress(10.0.0.1)`).
fn names_valid_for(error: &CertificateError) -> String {
    let CertificateError::NotValidForNameContext { presented, .. } = error else {
        return "it names other hosts".to_string();
    };
    let plain = |name: &str| {
        [("DnsName(\"", "\")"), ("IpAddress(", ")")]
            .iter()
            .find_map(|(open, close)| name.strip_prefix(open)?.strip_suffix(close))
            .unwrap_or(name)
            .to_string()
    };
    match presented.as_slice() {
        [] => "it names no host".to_string(),
        names => {
            let names: Vec<String> = names.iter().map(|n| plain(n)).collect();
            format!("it is valid only for {}", names.join(", "))
        }
    }
}

impl ServerCertVerifier for Verified {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        // webpki checks the chain first and the name last: a name error means the chain is good.
        match result {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                Err(refused(format!(
                    "the server's certificate is not signed by a CA in {}, so it is refused",
                    self.roots
                )))
            }
            Err(rustls::Error::InvalidCertificate(
                error @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            )) => Err(refused(format!(
                "the server's certificate is not valid for the host '{}' (sslmode=verify-full \
                 checks the name; verify-ca does not): {}",
                server_name.to_str(),
                names_valid_for(&error)
            ))),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
