//! http probe: one request, timed by phase (dns, connect, tls, time to first byte,
//! transfer), with the status, body size, certificate expiry and optional checks of the
//! status and body. Built on a bare hyper HTTP/1.1 connection so each phase is visible.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{secs, tcp, tls, ErrorClass, Fields, HttpFields, Measured, ProbeError, ProbeSpec};

/// Bodies are read to the end for timing; this much is kept for `body_match`.
const MATCH_WINDOW: usize = 1 << 20;

pub async fn run(spec: &ProbeSpec) -> Measured {
    let mut fields = HttpFields::default();
    let error = measure(spec, &mut fields).await.err();
    (Fields::Http(fields), error)
}

async fn measure(spec: &ProbeSpec, fields: &mut HttpFields) -> Result<(), ProbeError> {
    let uri: Uri = spec
        .target
        .parse()
        .map_err(|e| ProbeError::new(ErrorClass::Local, format!("bad URL {}: {e}", spec.target)))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or_else(|| ProbeError::new(ErrorClass::Local, "URL has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });

    let start = Instant::now();
    let addr = tcp::resolve(&format!("{}:{port}", bracket(&host))).await?;
    fields.dns_seconds = Some(secs(start.elapsed()));

    let start = Instant::now();
    let stream = tcp::connect(addr).await?;
    fields.connect_seconds = Some(secs(start.elapsed()));

    if https {
        let config = tls::client_config(spec.options.insecure_tls.unwrap_or(false), &[b"http/1.1"]);
        let (stream, took, expiry) = tls::handshake(stream, &host, config).await?;
        fields.tls_seconds = Some(secs(took));
        fields.tls_cert_expiry_seconds = expiry;
        exchange(stream, spec, &uri, fields).await
    } else {
        exchange(stream, spec, &uri, fields).await
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

async fn exchange<S>(
    stream: S,
    spec: &ProbeSpec,
    uri: &Uri,
    fields: &mut HttpFields,
) -> Result<(), ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = |e: hyper::Error| ProbeError::new(ErrorClass::Protocol, format!("HTTP: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(protocol)?;
    let conn = tokio::spawn(conn);

    let method = spec.options.method.as_deref().unwrap_or("GET");
    let method = hyper::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|e| ProbeError::new(ErrorClass::Local, format!("bad method `{method}`: {e}")))?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("edgeprobe-agent/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeError::new(ErrorClass::Local, format!("bad request: {e}")))?;

    let start = Instant::now();
    let response = sender.send_request(request).await.map_err(protocol)?;
    fields.ttfb_seconds = Some(secs(start.elapsed()));
    let status = response.status().as_u16();
    fields.status_code = Some(status);

    let start = Instant::now();
    let mut body = response.into_body();
    let mut kept = Vec::new();
    let want_body = spec.options.body_match.is_some();
    while !body.is_end_stream() {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    fields.body_bytes += data.len() as u64;
                    if want_body && kept.len() < MATCH_WINDOW {
                        let room = MATCH_WINDOW - kept.len();
                        kept.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
            }
            Some(Err(e)) => return Err(protocol(e)),
            None => break,
        }
    }
    fields.transfer_seconds = Some(secs(start.elapsed()));
    conn.abort();

    match spec.options.expect_status {
        Some(expected) if expected != status => {
            return Err(ProbeError::new(
                ErrorClass::HttpStatus,
                format!("status {status}, expected {expected}"),
            ))
        }
        None if status >= 400 => {
            return Err(ProbeError::new(
                ErrorClass::HttpStatus,
                format!("status {status}"),
            ))
        }
        _ => {}
    }
    if let Some(needle) = &spec.options.body_match {
        let haystack = String::from_utf8_lossy(&kept);
        if !haystack.contains(needle.as_str()) {
            return Err(ProbeError::new(
                ErrorClass::Mismatch,
                format!("body does not contain `{needle}`"),
            ));
        }
    }
    Ok(())
}
