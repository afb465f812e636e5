//! Settings, layered: command-line flag > environment variable > config file > built-in default.
//!
//! Each program declares its options once, as a struct of `Option`s that is at the same time a
//! set of clap flags (with their `env` fallbacks) and a section of the TOML config file. The
//! [`layered!`](crate::layered) macro merges the two field by field; the program then resolves
//! the result into plain settings, applying defaults and validating. A wrong key in the file, an
//! unparsable value or an out-of-range number is a [`ConfigError`] that says where it was, and the
//! binaries exit with code 2 for it, as clap does for a wrong flag.
//!
//! The file is `--config FILE` (`GEMMQ_CONFIG`), or `config/gemmq.toml` when that exists in the
//! working directory. Sections: `[broker]`, `[producer]`, `[consumer]`, `[collector]`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Where RabbitMQ is when nothing else says: the local broker's default guest account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "config/gemmq.toml";
/// RabbitMQ 4's default `max_message_size`; 3.x allows 128 MiB, so this is the safe choice.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

impl ConfigError {
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            name,
            message: message.into(),
        }
    }
}

/// The exit code for an error: 2 when a setting was wrong (as clap does for flags), else 1.
pub fn exit_code(err: &(dyn std::error::Error + 'static)) -> u8 {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<ConfigError>() {
            return 2;
        }
        cur = e.source();
    }
    1
}

/// Merges two layers of the same options struct: `self` wins wherever it has a value.
pub trait Layered {
    fn or(self, lower: Self) -> Self;
}

/// Implements [`Layered`] for a struct whose listed fields are all `Option`s.
#[macro_export]
macro_rules! layered {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::config::Layered for $ty {
            fn or(self, lower: Self) -> Self {
                Self { $($field: self.$field.or(lower.$field)),* }
            }
        }
    };
}

/// The parsed config file: one TOML table per program plus `[broker]`.
#[derive(Debug, Default)]
pub struct ConfigFile {
    path: Option<PathBuf>,
    table: toml::Table,
}

impl ConfigFile {
    const SECTIONS: [&'static str; 4] = ["broker", "producer", "consumer", "collector"];

    /// Reads `explicit` if given (it must exist), else [`DEFAULT_CONFIG_FILE`] if it exists.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                if !p.exists() {
                    return Ok(Self::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: PathBuf) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if let Some(unknown) = table.keys().find(|k| !Self::SECTIONS.contains(&k.as_str())) {
            return Err(ConfigError::Parse {
                path,
                message: format!(
                    "unknown section [{unknown}]; the sections are {}",
                    Self::SECTIONS.join(", ")
                ),
            });
        }
        Ok(Self {
            path: Some(path),
            table,
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Deserializes one section; a missing section is all defaults.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, ConfigError> {
        match self.table.get(name) {
            None => Ok(T::default()),
            Some(value) => {
                value
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: self.path.clone().unwrap_or_default(),
                        message: format!("in [{name}]: {}", e.message()),
                    })
            }
        }
    }
}

/// How every program reaches the broker and names things on it.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerOptions {
    /// AMQP URL of the RabbitMQ broker, or of each node of a cluster, comma-separated: a
    /// program connects to the first that answers and, when it loses that node, to the next
    /// [default: amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, env = "AMQP_URL", value_name = "URL[,URL...]")]
    pub amqp_url: Option<String>,
    /// Prefix of every exchange and queue gemmq declares, so several deployments (or test runs)
    /// can share one broker [default: gemmq]
    #[arg(long, env = "GEMMQ_NAMESPACE", value_name = "NAME")]
    pub namespace: Option<String>,
    /// Largest message gemmq will publish or accept, e.g. 16MiB; RabbitMQ 4 refuses more than
    /// 16 MiB unless its max_message_size is raised [default: 16MiB]
    #[arg(long, env = "GEMMQ_MAX_MESSAGE_BYTES", value_name = "SIZE")]
    pub max_message_bytes: Option<bytesize::ByteSize>,
    /// How long a failed task waits in the retry queue before it is delivered again. It is an
    /// argument of the retry queue, so every program on one namespace must agree [default: 2s]
    #[arg(long, env = "GEMMQ_RETRY_DELAY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub retry_delay: Option<Duration>,
    /// Give up when the broker cannot be reached for this long (retrying with capped, jittered
    /// backoff meanwhile) [default: 60s]
    #[arg(long, env = "GEMMQ_CONNECT_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// PEM file of the CA that signed the broker's certificate, for amqps:// URLs and an https
    /// management API [default: only the bundled public roots are trusted]
    #[arg(long, env = "GEMMQ_TLS_CA_FILE", value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate to present to a broker that asks for one (RabbitMQ's
    /// ssl_options.verify = verify_peer); needs --tls-key-file
    #[arg(long, env = "GEMMQ_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The unencrypted PEM private key of --tls-cert-file
    #[arg(long, env = "GEMMQ_TLS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,
}

crate::layered!(BrokerOptions {
    amqp_url,
    namespace,
    max_message_bytes,
    retry_delay,
    connect_timeout,
    tls_ca_file,
    tls_cert_file,
    tls_key_file
});

/// [`BrokerOptions`] with defaults applied and checked.
#[derive(Clone)]
pub struct BrokerSettings {
    /// The nodes to try, in order (one for a single broker).
    pub amqp_urls: Vec<String>,
    pub namespace: String,
    pub max_message_bytes: u64,
    pub retry_delay: Duration,
    pub connect_timeout: Duration,
    /// The CA to trust and the client certificate, for amqps:// and https.
    pub tls: crate::tls::TlsSettings,
}

/// The URLs with their passwords masked: settings end up in logs and panic messages.
impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("amqp_urls", &self.redacted_url())
            .field("namespace", &self.namespace)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("retry_delay", &self.retry_delay)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

impl BrokerOptions {
    pub fn resolve(self) -> Result<BrokerSettings, ConfigError> {
        let namespace = self.namespace.unwrap_or_else(|| "gemmq".into());
        crate::topology::check_name("namespace", &namespace)?;
        let max_message_bytes = self
            .max_message_bytes
            .map_or(DEFAULT_MAX_MESSAGE_BYTES, |b| b.as_u64());
        if !(64 * 1024..=512 * 1024 * 1024).contains(&max_message_bytes) {
            return Err(ConfigError::invalid(
                "max-message-bytes",
                format!("{max_message_bytes} bytes is outside 64KiB..512MiB"),
            ));
        }
        let retry_delay = self.retry_delay.unwrap_or(Duration::from_secs(2));
        if retry_delay.as_millis() > u32::MAX as u128 {
            return Err(ConfigError::invalid("retry-delay", "too long"));
        }
        let amqp_urls = parse_urls(self.amqp_url.as_deref().unwrap_or(DEFAULT_AMQP_URL))?;
        let tls = crate::tls::TlsSettings::load(
            self.tls_ca_file.as_deref(),
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
        )?;
        Ok(BrokerSettings {
            amqp_urls,
            namespace,
            max_message_bytes,
            retry_delay,
            connect_timeout: self.connect_timeout.unwrap_or(Duration::from_secs(60)),
            tls,
        })
    }
}

/// `AMQP_URL`'s comma-separated list of nodes, each checked.
fn parse_urls(list: &str) -> Result<Vec<String>, ConfigError> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect();
    if urls.is_empty() {
        return Err(ConfigError::invalid(
            "amqp-url",
            "no URL given: write amqp://user:pass@host:5672/%2f, or several separated by commas",
        ));
    }
    if let Some(bad) = urls
        .iter()
        .find(|u| !(u.starts_with("amqp://") || u.starts_with("amqps://")))
    {
        return Err(ConfigError::invalid(
            "amqp-url",
            format!(
                "{:?} is not an amqp:// or amqps:// URL (several nodes are separated by commas)",
                redact_url(bad)
            ),
        ));
    }
    Ok(urls)
}

/// A URL (AMQP or HTTP) with its password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = url[scheme + 3..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl BrokerSettings {
    /// The URLs with their passwords replaced, for logs.
    pub fn redacted_url(&self) -> String {
        let redacted: Vec<String> = self.amqp_urls.iter().map(|u| redact_url(u)).collect();
        redacted.join(",")
    }

    pub fn topology(&self) -> crate::Topology {
        crate::Topology::new(&self.namespace, self.retry_delay)
    }

    /// What to warn about how the broker is reached: an `amqp://` URL to another machine sends
    /// everything, password included, in the clear; TLS settings with no `amqps://` URL protect
    /// nothing on AMQP (they still serve an https management API, so they are not an error).
    pub fn transport_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let remote = crate::tls::plaintext_remote_hosts(&self.amqp_urls);
        if !remote.is_empty() {
            warnings.push(format!(
                "AMQP to {} is not encrypted: the traffic, password included, crosses the network in plaintext; use amqps:// (see README, workers on other machines)",
                remote.join(", ")
            ));
        }
        let any_amqps = self.amqp_urls.iter().any(|u| u.starts_with("amqps://"));
        if self.tls.is_configured() && !any_amqps {
            warnings.push(
                "TLS settings are given but no broker URL is amqps://: AMQP does not use them (only an https management URL does)".into(),
            );
        }
        warnings
    }
}

/// Flags every program shares: where the config file is and how to reach the broker.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML config file [default: config/gemmq.toml if it exists]
    #[arg(long, env = "GEMMQ_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerOptions,
}

impl CommonArgs {
    /// Loads the config file and returns it with the broker settings resolved from all layers.
    pub fn load(&self) -> Result<(ConfigFile, BrokerSettings), ConfigError> {
        let file = ConfigFile::load(self.config.as_deref())?;
        let broker = self
            .broker
            .clone()
            .or(file.section::<BrokerOptions>("broker")?)
            .resolve()?;
        Ok((file, broker))
    }
}

/// A `1s..3s` style range of durations (or a single duration, or `0` for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
}

impl DurationRange {
    pub fn is_zero(&self) -> bool {
        self.max.is_zero()
    }
}

impl std::str::FromStr for DurationRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| -> Result<Duration, String> {
            let p = p.trim();
            if p == "0" {
                return Ok(Duration::ZERO);
            }
            humantime::parse_duration(p).map_err(|e| format!("{p:?}: {e}"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let d = parse(s)?;
                (d, d)
            }
        };
        if min > max {
            return Err(format!("{s:?}: the range's start is after its end"));
        }
        Ok(DurationRange { min, max })
    }
}

impl std::fmt::Display for DurationRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", humantime::format_duration(self.min))
        } else {
            write!(
                f,
                "{}..{}",
                humantime::format_duration(self.min),
                humantime::format_duration(self.max)
            )
        }
    }
}

impl<'de> Deserialize<'de> for DurationRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let file = ConfigFile::parse(
            "[broker]\nnamespace = \"from-file\"\nretry-delay = \"5s\"\n",
            "t.toml".into(),
        )
        .unwrap();
        let flags = BrokerOptions {
            namespace: Some("from-flag".into()),
            ..Default::default()
        };
        let s = flags.or(file.section("broker").unwrap()).resolve().unwrap();
        assert_eq!(s.namespace, "from-flag");
        assert_eq!(s.retry_delay, Duration::from_secs(5));
        assert_eq!(s.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    }

    #[test]
    fn unknown_keys_and_sections_are_named_in_the_error() {
        let err = ConfigFile::parse("[brokr]\n", "t.toml".into()).unwrap_err();
        assert!(err.to_string().contains("unknown section [brokr]"), "{err}");
        let file = ConfigFile::parse("[broker]\nnamspace = \"x\"\n", "t.toml".into()).unwrap();
        let err = file.section::<BrokerOptions>("broker").unwrap_err();
        assert!(err.to_string().contains("namspace"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_setting_named() {
        assert!(
            with_url("http://x")
                .unwrap_err()
                .to_string()
                .contains("amqp-url")
        );
        let bad = BrokerOptions {
            namespace: Some("has space".into()),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn duration_ranges_parse_like_the_demo_writes_them() {
        let r: DurationRange = "1s..3s".parse().unwrap();
        assert_eq!(
            (r.min, r.max),
            (Duration::from_secs(1), Duration::from_secs(3))
        );
        let r: DurationRange = "250ms".parse().unwrap();
        assert_eq!(r.min, r.max);
        assert!("0".parse::<DurationRange>().unwrap().is_zero());
        assert!("3s..1s".parse::<DurationRange>().is_err());
        assert!("soon".parse::<DurationRange>().is_err());
    }

    /// The broker settings with `AMQP_URL` = `url` and the rest defaults.
    fn with_url(url: &str) -> Result<BrokerSettings, ConfigError> {
        BrokerOptions {
            amqp_url: Some(url.into()),
            ..Default::default()
        }
        .resolve()
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        let s = with_url("amqp://user:secret@host:5672/%2f").unwrap();
        assert_eq!(s.redacted_url(), "amqp://user:***@host:5672/%2f");
    }

    #[test]
    fn debug_output_of_the_settings_masks_every_password() {
        let s = with_url("amqp://u:secret1@n1:5672/%2f,amqps://u:secret2@n2:5671/%2f").unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("u:***@n2:5671"), "{shown}");
    }

    #[test]
    fn plaintext_amqp_to_another_machine_is_warned_about_once_for_all_its_hosts() {
        let local = with_url("amqp://u:p@127.0.0.1:5672/%2f,amqp://u:p@localhost/%2f").unwrap();
        assert!(local.transport_warnings().is_empty());
        let tls = with_url("amqps://u:p@broker.example:5671/%2f").unwrap();
        assert!(tls.transport_warnings().is_empty());

        let remote =
            with_url("amqp://u:secret@10.0.0.5:5672/%2f,amqp://u:secret@broker.example/%2f")
                .unwrap();
        let warnings = remote.transport_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("10.0.0.5, broker.example"),
            "{warnings:?}"
        );
        assert!(warnings[0].contains("plaintext"), "{warnings:?}");
        assert!(warnings[0].contains("amqps://"), "{warnings:?}");
        assert!(!warnings[0].contains("secret"), "{warnings:?}");
    }

    #[test]
    fn tls_files_that_cannot_be_read_are_config_errors_naming_the_setting() {
        let opts = BrokerOptions {
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let err = opts.resolve().unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("tls-ca-file"), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_cluster_is_a_comma_separated_list_of_nodes_tried_in_order() {
        let s = with_url("amqp://u:p@n1:5672/%2f, amqp://u:p@n2:5672/%2f,").unwrap();
        assert_eq!(
            s.amqp_urls,
            ["amqp://u:p@n1:5672/%2f", "amqp://u:p@n2:5672/%2f"]
        );
        assert_eq!(
            s.redacted_url(),
            "amqp://u:***@n1:5672/%2f,amqp://u:***@n2:5672/%2f"
        );
        for bad in ["amqp://u:secret@n1/%2f,n2:5672", " , "] {
            let err = with_url(bad).unwrap_err().to_string();
            assert!(err.contains("amqp-url"), "{bad}: {err}");
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
    }
}
