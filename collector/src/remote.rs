//! The operator commands from a laptop without database access (`--api URL --cert --key
//! --ca`, SPEC section 18): the collector's HTTP API over mutual TLS with an operator
//! certificate, through reqwest on rustls. The commands print what they print over the
//! database: the API answers with the same documents (`api.rs` serialises the very types
//! the database path returns), which are read back into those types here.
//!
//! Invariants: only the fleet CA given with `--ca` is trusted (no system roots); an API
//! error (`{"error": ..}`) becomes the command's failure with the API's reason: 4xx is a
//! usage failure (exit 2), anything else a runtime one (exit 1).

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::cli::Failure;

/// How long one API request may take (an export streams for longer: see `stream`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The API of one collector, as an operator.
pub struct Remote {
    base: String,
    http: reqwest::Client,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|e| Failure::Usage(format!("{}: cannot read the {what}: {e}", path.display())))
}

impl Remote {
    /// A client for `url` (`https://collector:9443`) with the operator's certificate and
    /// key and the fleet CA.
    pub fn new(url: &str, cert: &Path, key: &Path, ca: &Path) -> Result<Remote, Failure> {
        let mut pem = read(cert, "operator certificate")?;
        pem.push(b'\n');
        pem.extend(read(key, "operator key")?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            Failure::Usage(format!(
                "{} / {}: not a certificate and key in PEM: {e}",
                cert.display(),
                key.display()
            ))
        })?;
        let ca_pem = read(ca, "fleet CA certificate")?;
        let ca = reqwest::Certificate::from_pem(&ca_pem).map_err(|e| {
            Failure::Usage(format!("{}: not a certificate in PEM: {e}", ca.display()))
        })?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Failure::Usage(format!("--api: {e}")))?;
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(Failure::Usage(format!(
                "--api {url}: the API is HTTPS only (https://HOST:PORT)"
            )));
        }
        Ok(Remote { base, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The answer as `T`, or the API's error as a failure.
    async fn answer<T: DeserializeOwned>(
        &self,
        sent: reqwest::RequestBuilder,
    ) -> Result<T, Failure> {
        let response = self.send(sent.timeout(REQUEST_TIMEOUT)).await?;
        let text = response
            .text()
            .await
            .map_err(|e| Failure::Runtime(format!("error: reading the API's answer: {e}")))?;
        serde_json::from_str(&text).map_err(|e| {
            Failure::Runtime(format!(
                "error: the API answered something this command does not understand ({e}); is the collector the same version?"
            ))
        })
    }

    /// Sends, and turns an error status into a failure with the API's reason.
    async fn send(&self, sent: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let response = sent.send().await.map_err(|e| {
            Failure::Runtime(format!(
                "error: cannot reach the API at {}: {}",
                self.base,
                reason_chain(&e)
            ))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(text);
        Err(if status.is_client_error() {
            Failure::Usage(reason)
        } else {
            Failure::Runtime(format!("error: the API answered {status}: {reason}"))
        })
    }

    /// `GET path` as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        self.answer(self.http.get(self.url(path))).await
    }

    /// `POST path` with a JSON body, as `T`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, Failure> {
        self.answer(self.http.post(self.url(path)).json(body)).await
    }

    /// `DELETE path`, as `T`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        self.answer(self.http.delete(self.url(path))).await
    }

    /// `GET path` for a streamed body, read chunk by chunk by the caller.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, Failure> {
        self.send(self.http.get(self.url(path))).await
    }
}

/// An error with its causes ("error sending request: ... : certificate unknown").
fn reason_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// `k=v` pairs as repeated query parameters, percent-encoded.
pub fn query(pairs: &[(&str, String)]) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}
