//! TLS: which CA to trust and which client certificate to present, for `amqps://` and for the
//! management API over https; why a TLS handshake failed; and which `amqp://` URLs send the
//! password in the clear.
//!
//! The files are read and checked once, when the settings are resolved, so a wrong path or a
//! file that is not PEM is a config error at startup, not a failed handshake later.
//!
//! Trust: AMQP (lapin's rustls with ring) trusts the CA file *in addition to* the bundled Mozilla
//! roots (lapin offers no way to replace them); the management API client trusts the CA file
//! instead of its bundled roots. Either way a broker certificate signed by a private CA is
//! trusted only when that CA is in the file, and the host name in the URL must be one the
//! certificate names.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::config::ConfigError;

/// The CA file and the client certificate, read and checked.
#[derive(Clone, Default)]
pub struct TlsSettings {
    ca: Option<CaFile>,
    client: Option<ClientCert>,
}

#[derive(Clone)]
struct CaFile {
    path: PathBuf,
    pem: String,
    certs: Vec<CertificateDer<'static>>,
}

#[derive(Clone)]
struct ClientCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// Paths only: the key (and the certificates' bytes) never reach a log line.
impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_file", &self.ca.as_ref().map(|c| &c.path))
            .field("cert_file", &self.client.as_ref().map(|c| &c.cert_path))
            .field("key_file", &self.client.as_ref().map(|c| &c.key_path))
            .finish()
    }
}

impl TlsSettings {
    /// Reads and checks the files: the CA file must hold at least one certificate and nothing
    /// unparsable; the client certificate and key come together, and the key must be the
    /// certificate's.
    pub fn load(
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let ca = ca_file.map(load_ca).transpose()?;
        let client = match (cert_file, key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(load_client_cert(cert, key)?),
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "tls-cert-file",
                    "a client certificate needs its key: set tls-key-file (GEMMQ_TLS_KEY_FILE) too",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "tls-key-file",
                    "a client key needs its certificate: set tls-cert-file (GEMMQ_TLS_CERT_FILE) too",
                ));
            }
        };
        Ok(TlsSettings { ca, client })
    }

    /// Whether any TLS setting was given.
    pub fn is_configured(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|c| c.path.as_path())
    }

    pub fn cert_file(&self) -> Option<&Path> {
        self.client.as_ref().map(|c| c.cert_path.as_path())
    }

    /// What is trusted, for error messages.
    pub fn trusted(&self) -> String {
        match &self.ca {
            Some(ca) => format!(
                "the CA file {} and the bundled public roots",
                ca.path.display()
            ),
            None => "only the bundled public roots (no tls-ca-file given)".into(),
        }
    }

    /// lapin's TLS config: used only for `amqps://` URLs.
    pub fn amqp_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            cert_chain: self.ca.as_ref().map(|c| c.pem.clone()),
            identity: self.client.as_ref().map(|c| OwnedIdentity::PKCS8 {
                pem: c.cert_pem.clone(),
                key: c.key_pem.clone(),
            }),
        }
    }

    /// The management API client's TLS config: used only for `https://`.
    pub fn http_config(&self) -> ureq::tls::TlsConfig {
        use ureq::tls::{Certificate, ClientCert as UreqClientCert, PrivateKey, RootCerts};
        let mut config = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &self.ca {
            let roots: Vec<Certificate<'static>> = ca
                .certs
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            config = config.root_certs(RootCerts::new_with_certs(&roots));
        }
        // Parsed already by `load`; a failure here cannot happen, and would only mean no client
        // certificate, which the server then refuses with a message of its own.
        let client = self.client.as_ref().and_then(|c| {
            let certs = ureq::tls::parse_pem(&c.cert_pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                    _ => None,
                })
                .collect::<Vec<_>>();
            let key = PrivateKey::from_pem(&c.key_pem).ok()?;
            Some(UreqClientCert::new_with_certs(&certs, key))
        });
        config.client_cert(client).build()
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::invalid(setting, format!("cannot read {}: {e}", path.display())))
}

fn pem_certs(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ConfigError::invalid(setting, format!("{} is not valid PEM: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(
            setting,
            format!(
                "{} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn load_ca(path: &Path) -> Result<CaFile, ConfigError> {
    let setting = "tls-ca-file";
    let bytes = read(setting, path)?;
    let certs = pem_certs(setting, path, &bytes)?;
    // lapin's TLS layer silently skips a certificate it cannot use as a root: say so here.
    let mut store = rustls::RootCertStore::empty();
    let (_, ignored) = store.add_parsable_certificates(certs.iter().cloned());
    if ignored > 0 {
        return Err(ConfigError::invalid(
            setting,
            format!(
                "{ignored} of the {} certificates in {} cannot be used as a CA",
                certs.len(),
                path.display()
            ),
        ));
    }
    let pem = String::from_utf8(bytes).map_err(|_| {
        ConfigError::invalid(
            setting,
            format!("{} is not a text PEM file", path.display()),
        )
    })?;
    Ok(CaFile {
        path: path.to_path_buf(),
        pem,
        certs,
    })
}

fn load_client_cert(cert_path: &Path, key_path: &Path) -> Result<ClientCert, ConfigError> {
    let cert_pem = read("tls-cert-file", cert_path)?;
    let certs = pem_certs("tls-cert-file", cert_path, &cert_pem)?;
    let key_pem = read("tls-key-file", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        ConfigError::invalid(
            "tls-key-file",
            format!(
                "{} holds no private key in PEM (PKCS#8, PKCS#1 or SEC1, unencrypted): {e}",
                key_path.display()
            ),
        )
    })?;
    let matches = rustls::crypto::ring::sign::any_supported_type(&key)
        .map(|key| rustls::sign::CertifiedKey::new(certs, key))
        .and_then(|certified| match certified.keys_match() {
            // A key type whose public half rustls cannot derive: the broker will tell.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
            other => other,
        });
    matches.map_err(|e| {
        ConfigError::invalid(
            "tls-key-file",
            format!(
                "{} is not the key of the certificate {}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    Ok(ClientCert {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        cert_pem,
        key_pem,
    })
}

/// Why a TLS handshake with the broker failed, when retrying cannot help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsProblem {
    /// The broker's certificate is not signed by a CA this program trusts.
    Untrusted,
    /// The broker's certificate does not name the host in the URL.
    WrongHost,
    /// The broker's certificate has expired or is not valid yet (or this machine's clock is off).
    Expired,
    /// Another defect of the broker's certificate (bad signature, revoked, unusable).
    BadCertificate,
    /// What answered does not speak TLS: most likely the plaintext AMQP port.
    NotTls,
    /// The broker refused this program's client certificate, or wanted one and got none.
    ClientCertificateRefused,
}

impl TlsProblem {
    /// The problem `err` reports, if it is one of these; `None` for anything else (a refused
    /// TCP connection, a timeout), which may pass.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
                e.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            });
            if let Some(tls) = tls {
                return Self::of_rustls(tls);
            }
            cur = e.source();
        }
        None
    }

    fn of_rustls(err: &rustls::Error) -> Option<TlsProblem> {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        Some(match err {
            E::InvalidCertificate(c) => match c {
                C::UnknownIssuer => TlsProblem::Untrusted,
                C::NotValidForName | C::NotValidForNameContext { .. } => TlsProblem::WrongHost,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsProblem::Expired,
                _ => TlsProblem::BadCertificate,
            },
            // A plaintext AMQP listener answers a TLS hello with its protocol header: not a
            // TLS record.
            E::InvalidMessage(_) => TlsProblem::NotTls,
            E::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::AccessDenied,
            ) => TlsProblem::ClientCertificateRefused,
            E::NoCertificatesPresented => TlsProblem::BadCertificate,
            _ => return None,
        })
    }

    /// What to do about it, given what this program trusts and presents.
    pub fn advice(&self, tls: &TlsSettings) -> String {
        match self {
            TlsProblem::Untrusted => format!(
                "the broker's certificate is not trusted: it is not signed by a CA in {}. Set tls-ca-file (GEMMQ_TLS_CA_FILE) to the PEM file of the CA that signed the broker's certificate",
                tls.trusted()
            ),
            TlsProblem::WrongHost => "the broker's certificate is not valid for the host in the URL: connect by a name (or IP address) the certificate lists in its subjectAltName, or reissue the certificate with this one".into(),
            TlsProblem::Expired => "the broker's certificate has expired or is not valid yet: renew it (or check this machine's clock)".into(),
            TlsProblem::BadCertificate => "the broker's certificate is defective (signature, revocation or encoding): reissue it".into(),
            TlsProblem::NotTls => "the broker does not speak TLS on this port: an amqps:// URL needs RabbitMQ's TLS listener (listeners.ssl.default, usually 5671), not the plaintext one (5672)".into(),
            TlsProblem::ClientCertificateRefused => match tls.cert_file() {
                Some(cert) => format!(
                    "the broker refused the client certificate {}: it must be signed by a CA in the broker's ssl_options.cacertfile",
                    cert.display()
                ),
                None => "the broker requires a client certificate: set tls-cert-file and tls-key-file (GEMMQ_TLS_CERT_FILE, GEMMQ_TLS_KEY_FILE)".into(),
            },
        }
    }
}

/// Whether `host` (as in a URL: a name, an IPv4 address or a bracketed IPv6 address) is this
/// machine: `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The hosts of the `amqp://` URLs among `urls` that are not this machine: their traffic,
/// password included, crosses a network in the clear.
pub fn plaintext_remote_hosts(urls: &[String]) -> Vec<String> {
    urls.iter()
        .filter(|u| u.starts_with("amqp://"))
        .filter_map(|u| u.parse::<lapin::uri::AMQPUri>().ok())
        .map(|uri| uri.authority.host)
        .filter(|host| !is_loopback_host(host))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_localhost_127_slash_8_and_ipv6_one() {
        for host in [
            "localhost",
            "LOCALHOST",
            "localhost.",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "broker.example",
            "10.0.0.5",
            "128.0.0.1",
            "0.0.0.0",
            "[2001:db8::1]",
            "rabbitmq",
            "localhost.example.com",
            "notlocalhost",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn only_amqp_urls_to_other_machines_are_plaintext_over_a_network() {
        let urls = [
            "amqp://u:p@127.0.0.1:5672/%2f",
            "amqp://u:p@localhost/%2f",
            "amqps://u:p@broker.example:5671/%2f",
            "amqp://u:p@10.0.0.5:5672/%2f",
            "amqp://u:p@broker.example/%2f",
        ]
        .map(String::from);
        assert_eq!(
            plaintext_remote_hosts(&urls),
            ["10.0.0.5", "broker.example"]
        );
    }

    #[test]
    fn certificate_errors_are_told_apart_from_network_errors() {
        use rustls::{AlertDescription, CertificateError, Error};
        let wrapped =
            |e: Error| lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsProblem::Untrusted,
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsProblem::WrongHost,
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                TlsProblem::Expired,
            ),
            (
                Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                TlsProblem::NotTls,
            ),
            (
                Error::AlertReceived(AlertDescription::CertificateRequired),
                TlsProblem::ClientCertificateRefused,
            ),
        ];
        for (err, problem) in cases {
            assert_eq!(
                TlsProblem::of(&wrapped(err.clone())),
                Some(problem),
                "{err}"
            );
        }
        let refused =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(TlsProblem::of(&refused), None);
    }

    #[test]
    fn the_untrusted_advice_names_the_setting_and_the_ca_file() {
        let advice = TlsProblem::Untrusted.advice(&TlsSettings::default());
        assert!(advice.contains("not trusted"), "{advice}");
        assert!(advice.contains("GEMMQ_TLS_CA_FILE"), "{advice}");
    }

    #[test]
    fn a_missing_or_non_pem_file_is_a_config_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = TlsSettings::load(Some(&missing), None, None).unwrap_err();
        assert!(err.to_string().contains("tls-ca-file"), "{err}");
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let err = TlsSettings::load(Some(&junk), None, None).unwrap_err();
        assert!(err.to_string().contains("junk.pem"), "{err}");
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    #[test]
    fn a_client_certificate_and_its_key_come_together() {
        let p = Path::new("/dev/null");
        let err = TlsSettings::load(None, Some(p), None).unwrap_err();
        assert!(err.to_string().contains("tls-key-file"), "{err}");
        let err = TlsSettings::load(None, None, Some(p)).unwrap_err();
        assert!(err.to_string().contains("tls-cert-file"), "{err}");
    }

    #[test]
    fn debug_output_shows_paths_not_keys() {
        let s = TlsSettings {
            ca: None,
            client: Some(ClientCert {
                cert_path: "c.pem".into(),
                key_path: "k.pem".into(),
                cert_pem: b"CERT".to_vec(),
                key_pem: b"SECRET KEY".to_vec(),
            }),
        };
        let shown = format!("{s:?}");
        assert!(
            shown.contains("k.pem") && !shown.contains("SECRET"),
            "{shown}"
        );
    }
}
