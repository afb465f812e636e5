//! RabbitMQ's management HTTP API: the one client that `gemmq-collector status`, the bench and
//! the tests use to read queue figures, connections and bindings.
//!
//! AMQP cannot answer those questions (how many consumers a queue has, what a connection has
//! been sent), so this is the only place gemmq speaks HTTP. Calls are blocking (ureq): an async
//! caller wraps them in `spawn_blocking`. Figures lag the broker by about five seconds; a passive
//! `queue_declare` is exact and immediate where it is enough.
//!
//! Where the API is and who logs in: a management URL when one is given (`GEMMQ_MANAGEMENT_URL`;
//! it may carry `user:password@`), otherwise `http://<AMQP host>:15672`, or
//! `https://<AMQP host>:15671` for an `amqps://` URL; the account is the URL's own or else the
//! AMQP URL's, so a deployment with one account needs no second setting. Over https the CA file
//! and client certificate are AMQP's ([`crate::tls`]).

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::{BrokerSettings, redact_url as redact};
use crate::tls::TlsSettings;

/// How long one call may take before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The management API's default port, for a base URL derived from an `amqp://` URL.
pub const DEFAULT_PORT: u16 = 15672;
/// RabbitMQ's usual https port for it (`management.ssl.port`), for one derived from `amqps://`.
pub const DEFAULT_TLS_PORT: u16 = 15671;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("cannot parse {what} {url:?}: {reason}")]
    Url {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error(
        "{method} {url}: {error} (is the management plugin enabled? `rabbitmq-plugins enable rabbitmq_management`; or set GEMMQ_MANAGEMENT_URL)"
    )]
    Http {
        method: &'static str,
        url: String,
        error: Box<ureq::Error>,
    },
    #[error("{url} answered with something that is not the expected JSON: {error}")]
    Json {
        url: String,
        error: Box<ureq::Error>,
    },
}

impl ManagementError {
    /// Whether the API answered 404: what was asked for does not exist (yet).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ManagementError::Http { error, .. } if matches!(**error, ureq::Error::StatusCode(404)))
    }
}

/// A client of one broker's management API, for one virtual host.
#[derive(Clone)]
pub struct Management {
    base: String,
    authorization: String,
    vhost: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &self.base)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// The API of the broker at `amqp_url`, at `management_url` when given; https trusts only the
    /// bundled public roots (see [`Management::new_with_tls`]).
    pub fn new(amqp_url: &str, management_url: Option<&str>) -> Result<Self, ManagementError> {
        Self::new_with_tls(amqp_url, management_url, &TlsSettings::default())
    }

    /// Like [`Management::new`], with the CA file and client certificate of `tls` for https.
    pub fn new_with_tls(
        amqp_url: &str,
        management_url: Option<&str>,
        tls: &TlsSettings,
    ) -> Result<Self, ManagementError> {
        let uri: lapin::uri::AMQPUri = amqp_url.parse().map_err(|reason| ManagementError::Url {
            what: "the AMQP URL",
            url: redact(amqp_url),
            reason,
        })?;
        let (base, account) = match management_url.map(str::trim).filter(|u| !u.is_empty()) {
            Some(url) => split_userinfo(url)?,
            None => match uri.scheme {
                lapin::uri::AMQPScheme::AMQPS => (
                    format!("https://{}:{DEFAULT_TLS_PORT}", uri.authority.host),
                    None,
                ),
                lapin::uri::AMQPScheme::AMQP => (
                    format!("http://{}:{DEFAULT_PORT}", uri.authority.host),
                    None,
                ),
            },
        };
        let (user, pass) = account.unwrap_or_else(|| {
            let info = &uri.authority.userinfo;
            (info.username.clone(), info.password.clone())
        });
        let vhost = if uri.vhost.is_empty() {
            "/"
        } else {
            &uri.vhost
        };
        Ok(Management {
            base,
            authorization: basic_auth(&user, &pass),
            vhost: encode_path_segment(vhost),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(TIMEOUT))
                .tls_config(tls.http_config())
                .build()
                .into(),
        })
    }

    /// The base URL, without credentials (for messages).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The virtual host, encoded for a path: `/api/queues/{vhost}`.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// GET `path` (from `/api/...`) as JSON.
    pub fn get(&self, path: &str) -> Result<serde_json::Value, ManagementError> {
        self.get_as(path)
    }

    /// GET `path` (from `/api/...`) and deserialize it.
    pub fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T, ManagementError> {
        let url = format!("{}{path}", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &self.authorization)
            .call()
            .map_err(|e| ManagementError::Http {
                method: "GET",
                url: url.clone(),
                error: Box::new(e),
            })?;
        resp.body_mut()
            .read_json()
            .map_err(|e| ManagementError::Json {
                url,
                error: Box::new(e),
            })
    }

    /// GET `path` (`{vhost}` in it replaced by the vhost) from a cluster's API: at
    /// `management_url` when given, or else of each of `broker`'s nodes in turn until one
    /// answers (every node serves it; one that is down does not).
    pub fn get_from_any<T: DeserializeOwned>(
        broker: &BrokerSettings,
        management_url: Option<&str>,
        path: &str,
    ) -> Result<T, ManagementError> {
        let mut last = None;
        for amqp in &broker.amqp_urls {
            let api = Management::new_with_tls(amqp, management_url, &broker.tls)?;
            match api.get_as(&path.replace("{vhost}", api.vhost())) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
            if management_url.is_some() {
                break;
            }
        }
        Err(last.unwrap_or_else(|| ManagementError::Url {
            what: "the AMQP URL",
            url: String::new(),
            reason: "no broker URL given".into(),
        }))
    }

    /// DELETE `path` (from `/api/...`).
    pub fn delete(&self, path: &str) -> Result<(), ManagementError> {
        let url = format!("{}{path}", self.base);
        self.agent
            .delete(&url)
            .header("Authorization", &self.authorization)
            .call()
            .map_err(|e| ManagementError::Http {
                method: "DELETE",
                url,
                error: Box::new(e),
            })?;
        Ok(())
    }

    /// RabbitMQ's version, from `/api/overview`.
    pub fn rabbitmq_version(&self) -> Result<String, ManagementError> {
        let v = self.get("/api/overview")?;
        Ok(v["rabbitmq_version"]
            .as_str()
            .unwrap_or("unknown")
            .to_string())
    }

    /// The names of this virtual host's queues or exchanges (`kind`: "queues" or "exchanges").
    pub fn names(&self, kind: &str) -> Result<Vec<String>, ManagementError> {
        let items: Vec<Named> = self.get_as(&format!("/api/{kind}/{}?columns=name", self.vhost))?;
        Ok(items.into_iter().map(|n| n.name).collect())
    }

    /// Deletes every queue and exchange of this virtual host whose name starts with `prefix`;
    /// returns how many it deleted. Best effort: the first failure to list is returned, a failed
    /// deletion is skipped (something else may have deleted it first).
    pub fn delete_prefixed(&self, prefix: &str) -> Result<usize, ManagementError> {
        let mut deleted = 0;
        for kind in ["queues", "exchanges"] {
            for name in self.names(kind)? {
                if name.starts_with(prefix)
                    && self
                        .delete(&format!(
                            "/api/{kind}/{}/{}",
                            self.vhost,
                            encode_path_segment(&name)
                        ))
                        .is_ok()
                {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

#[derive(serde::Deserialize)]
struct Named {
    name: String,
}

/// `http://user:pass@host:port/` → (`http://host:port`, Some((user, pass))).
fn split_userinfo(url: &str) -> Result<(String, Option<(String, String)>), ManagementError> {
    let bad = |reason: &str| ManagementError::Url {
        what: "the management URL",
        url: redact(url),
        reason: reason.into(),
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected http://host:port"))?;
    if scheme != "http" && scheme != "https" {
        return Err(bad("expected an http:// or https:// URL"));
    }
    let rest = rest.trim_end_matches('/');
    let (account, host) = match rest.rsplit_once('@') {
        Some((info, host)) => {
            let (u, p) = info.split_once(':').unwrap_or((info, ""));
            (Some((percent_decode(u), percent_decode(p))), host)
        }
        None => (None, rest),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((format!("{scheme}://{host}"), account))
}

fn basic_auth(user: &str, pass: &str) -> String {
    use base64::prelude::{BASE64_STANDARD, Engine};
    format!("Basic {}", BASE64_STANDARD.encode(format!("{user}:{pass}")))
}

/// Percent-encodes everything but unreserved characters: a vhost "/" is "%2F" in a path.
fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_management_url_the_api_is_on_the_amqp_host_with_the_amqp_account() {
        let m = Management::new("amqp://gemmq:s3cret@broker.example:5673/%2f", None).unwrap();
        assert_eq!(m.base(), "http://broker.example:15672");
        assert_eq!(m.vhost(), "%2F");
        assert_eq!(m.authorization, basic_auth("gemmq", "s3cret"));
        assert_eq!(basic_auth("guest", "guest"), "Basic Z3Vlc3Q6Z3Vlc3Q=");
    }

    #[test]
    fn an_amqps_broker_has_its_api_over_https_on_15671() {
        let m = Management::new("amqps://gemmq:pw@broker.example:5671/%2f", None).unwrap();
        assert_eq!(m.base(), "https://broker.example:15671");
    }

    #[test]
    fn a_management_url_sets_the_place_and_may_set_the_account() {
        let m = Management::new(
            "amqp://gemmq:pw@127.0.0.1:5673/jobs",
            Some("http://127.0.0.1:15673/"),
        )
        .unwrap();
        assert_eq!(m.base(), "http://127.0.0.1:15673");
        assert_eq!(m.vhost(), "jobs");
        assert_eq!(m.authorization, basic_auth("gemmq", "pw"));

        let m = Management::new(
            "amqp://gemmq:pw@127.0.0.1:5673/%2f",
            Some("http://admin:p%40ss@host:15672"),
        )
        .unwrap();
        assert_eq!(m.base(), "http://host:15672");
        assert_eq!(m.authorization, basic_auth("admin", "p@ss"));
    }

    #[test]
    fn a_bad_url_is_an_error_that_hides_the_password() {
        let e = Management::new("amqp://u:topsecret@host:5672/%2f", Some("host:15672"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("management URL") && e.contains("http://"), "{e}");
        let e = Management::new("amqp://u:topsecret@", None)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("topsecret"), "{e}");
    }
}
