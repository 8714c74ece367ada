//! http probe: one request, timed by phase (dns, connect, tls, time to first byte,
//! transfer), with the status, body size, certificate expiry and optional checks of the
//! status and body. Built on a bare hyper HTTP/1.1 connection so each phase is visible.
//!
//! - The target is parsed by the `url` crate (WHATWG, well kept) through `addr::HttpUrl`,
//!   which adds IPv6 zones. Userinfo (`http://user:pass@host/`) becomes a Basic
//!   `Authorization` header, percent-decoded, and is never sent in `Host`; the password
//!   leaves the probe only as `***` (`addr::redact`).
//! - Redirects are not followed unless `follow_redirects = N`: then up to N, each on a new
//!   connection; credentials go only to the origin they were given for. Phases dns,
//!   connect, tls and ttfb add up over the hops; status, certificate expiry, body and
//!   transfer are the last response's.
//! - `body_bytes` is the size on the wire (after transfer decoding, before content
//!   decoding); `body_match` searches the content, decoded (`body.rs`).
//! - Each phase is published as it ends (`Partial`), so a run cut off by its limit keeps
//!   what it measured.

use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::addr::{self, HttpUrl};
use super::body::{self, Search, Verdict};
use super::{
    secs, tcp, tls, ErrorClass, Fields, HttpFields, Measured, Partial, ProbeError, ProbeSpec,
};

pub async fn run(spec: &ProbeSpec, partial: &Partial) -> Measured {
    let mut probe = Probe {
        spec,
        partial,
        fields: HttpFields::default(),
    };
    let error = probe.measure().await.err();
    (Fields::Http(probe.fields), error)
}

struct Probe<'a> {
    spec: &'a ProbeSpec,
    partial: &'a Partial,
    fields: HttpFields,
}

/// What one hop answered, before its body is read.
enum Answer {
    Final,
    Redirect(String),
}

impl Probe<'_> {
    fn publish(&self, waiting_for: impl Into<String>) {
        self.partial
            .publish(Fields::Http(self.fields.clone()), waiting_for);
    }

    async fn measure(&mut self) -> Result<(), ProbeError> {
        let first =
            HttpUrl::parse(&self.spec.target).map_err(|e| ProbeError::new(ErrorClass::Local, e))?;
        let credentials = first.credentials();
        let max_hops = self.spec.options.follow_redirects.unwrap_or(0);
        let mut url = first.clone();
        let mut hops = 0;
        loop {
            let auth = credentials.as_ref().filter(|_| url.same_origin(&first));
            let auth = url.credentials().or_else(|| auth.cloned());
            match self.hop(&url, auth, hops < max_hops).await? {
                Answer::Final => return Ok(()),
                Answer::Redirect(location) => {
                    hops += 1;
                    url = url.join(&location).map_err(|e| {
                        ProbeError::new(ErrorClass::Protocol, format!("redirect {hops}: {e}"))
                    })?;
                }
            }
        }
    }

    fn check_status(&self) -> Result<(), ProbeError> {
        let status = self.fields.status_code.unwrap_or(0);
        match self.spec.options.expect_status {
            Some(expected) if expected != status => Err(ProbeError::new(
                ErrorClass::HttpStatus,
                format!("status {status}, expected {expected}"),
            )),
            None if status >= 400 => Err(ProbeError::new(
                ErrorClass::HttpStatus,
                format!("status {status}"),
            )),
            _ => Ok(()),
        }
    }

    /// One request on a new connection; reads the body of a final answer (a redirect is
    /// final unless `follow`).
    async fn hop(
        &mut self,
        url: &HttpUrl,
        auth: Option<(String, String)>,
        follow: bool,
    ) -> Result<Answer, ProbeError> {
        let host = url.host();
        let port = url.port();
        self.publish(format!("resolving {host}"));
        let start = Instant::now();
        let addr = addr::resolve(&host, port, &self.spec.link).await?;
        add(&mut self.fields.dns_seconds, start.elapsed());

        self.publish(format!("connecting to {addr}"));
        let start = Instant::now();
        let stream = tcp::connect(addr, &self.spec.link).await?;
        add(&mut self.fields.connect_seconds, start.elapsed());

        if url.https() {
            self.publish(format!("connected, TLS handshake with {addr}"));
            let config = tls::client_config(
                self.spec.options.insecure_tls.unwrap_or(false),
                &[b"http/1.1"],
            );
            let name = addr::parse_ip(&host).map_or(host.clone(), |(ip, _)| ip.to_string());
            let (stream, took, expiry) = tls::handshake(stream, &name, config).await?;
            add(&mut self.fields.tls_seconds, took);
            self.fields.tls_cert_expiry_seconds = expiry;
            self.exchange(stream, url, auth, follow).await
        } else {
            self.exchange(stream, url, auth, follow).await
        }
    }

    async fn exchange<S>(
        &mut self,
        stream: S,
        url: &HttpUrl,
        auth: Option<(String, String)>,
        follow: bool,
    ) -> Result<Answer, ProbeError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // hyper's own words are general ("error reading a body from connection"); what
        // could not be parsed is in its sources.
        let protocol =
            |e: hyper::Error| ProbeError::new(ErrorClass::Protocol, format!("HTTP: {}", chain(&e)));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(protocol)?;
        let conn = tokio::spawn(conn);

        let method = self.spec.options.method.as_deref().unwrap_or("GET");
        let method =
            hyper::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).map_err(|e| {
                ProbeError::new(ErrorClass::Local, format!("bad method `{method}`: {e}"))
            })?;
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(url.path_and_query())
            .header(hyper::header::HOST, url.authority())
            .header(
                hyper::header::USER_AGENT,
                concat!("edgeprobe-agent/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONNECTION, "close");
        if let Some((user, password)) = auth {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request = request.header(hyper::header::AUTHORIZATION, format!("Basic {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::new(ErrorClass::Local, format!("bad request: {e}")))?;

        self.publish("connected, waiting for the response");
        let start = Instant::now();
        let response = sender.send_request(request).await.map_err(protocol)?;
        add(&mut self.fields.ttfb_seconds, start.elapsed());
        let status = response.status();
        self.fields.status_code = Some(status.as_u16());
        self.fields.body_bytes = 0;
        self.fields.transfer_seconds = None;
        if let (true, Some(location)) = (
            follow && status.is_redirection(),
            response.headers().get(hyper::header::LOCATION),
        ) {
            // The body of a followed redirect is not measured; the next hop is.
            let location = String::from_utf8_lossy(location.as_bytes()).into_owned();
            conn.abort();
            return Ok(Answer::Redirect(location));
        }

        let encoding = response
            .headers()
            .get_all(hyper::header::CONTENT_ENCODING)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        let mut search = match &self.spec.options.body_match {
            Some(needle) => match body::codings(&encoding) {
                Ok(codings) => Some(Ok(Search::start(needle.as_bytes(), codings))),
                Err(unknown) => Some(Err(unknown)),
            },
            None => None,
        };

        self.publish("receiving the body");
        let start = Instant::now();
        let mut body = response.into_body();
        while !body.is_end_stream() {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.fields.body_bytes += data.len() as u64;
                        if let Some(Ok(search)) = &mut search {
                            search.feed(data);
                        }
                    }
                }
                Some(Err(e)) => {
                    self.fields.transfer_seconds = Some(secs(start.elapsed()));
                    return Err(protocol(e));
                }
                None => break,
            }
        }
        self.fields.transfer_seconds = Some(secs(start.elapsed()));
        conn.abort();
        self.check_status()?;

        let needle = self.spec.options.body_match.as_deref().unwrap_or_default();
        let mismatch = |why: String| Err(ProbeError::new(ErrorClass::Mismatch, why));
        match search {
            None => Ok(Answer::Final),
            Some(Err(unknown)) => mismatch(format!(
                "cannot search for `{needle}` in a body with Content-Encoding `{unknown}` \
                 (gzip, deflate and br are decoded)"
            )),
            Some(Ok(search)) => match search.finish().await {
                Verdict::Found => Ok(Answer::Final),
                Verdict::Absent { cut: false, .. } => {
                    mismatch(format!("body does not contain `{needle}`"))
                }
                Verdict::Absent {
                    searched,
                    cut: true,
                } => mismatch(format!(
                    "the first {} MiB of the body do not contain `{needle}`",
                    searched >> 20
                )),
                Verdict::Undecodable(e) => Err(ProbeError::new(
                    ErrorClass::Protocol,
                    format!("body is not valid Content-Encoding `{encoding}`: {e}"),
                )),
            },
        }
    }
}

/// Adds a phase's time to its field (phases add up over redirect hops).
fn add(field: &mut Option<f64>, took: std::time::Duration) {
    *field = Some(field.unwrap_or(0.0) + secs(took));
}

/// An error and its sources, each said once: `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut said = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push_str(": ");
            said.push_str(&text);
        }
        source = cause.source();
    }
    said
}
