//! The networkQuality configuration (draft-ietf-ippm-responsiveness-09 section 8.1):
//! where it is, and the three test URLs it names.
//!
//! Keys: the draft's `urls.large_download_url`, `urls.small_download_url`,
//! `urls.upload_url`, or Apple's `urls.large_https_download_url`,
//! `urls.small_https_download_url`, `urls.https_upload_url` (what Apple's and Cloudflare's
//! servers publish); the draft's name wins where both are present. `version`, when present,
//! must be 1; `test_endpoint`, when present, is the host to connect to instead of the URLs'
//! host. A missing URL, or URLs on different hosts, make the configuration invalid (the
//! draft: "the client MUST ignore the entire JSON object"): class `protocol`.

use serde_json::Value;

use super::super::addr::HttpUrl;
use super::super::{ErrorClass, ProbeError};

/// The well-known path (RFC 8615) of a networkQuality configuration.
pub const WELL_KNOWN: &str = "/.well-known/nq";

/// The test URLs of one networkQuality server.
#[derive(Debug, Clone)]
pub struct Config {
    pub large: HttpUrl,
    pub small: HttpUrl,
    pub upload: HttpUrl,
    /// Host to connect to instead of the URLs' host (`test_endpoint`).
    pub test_endpoint: Option<String>,
}

/// The configuration URL of a target: the URL itself when its path ends in
/// `/.well-known/nq`, else that path under the target's base URL.
pub fn config_url(target: &str) -> Result<HttpUrl, ProbeError> {
    let url = HttpUrl::parse(target).map_err(|e| ProbeError::new(ErrorClass::Local, e))?;
    if url.url.path().trim_end_matches('/').ends_with(WELL_KNOWN) {
        return Ok(url);
    }
    let base = url.url.path().trim_end_matches('/');
    url.join(&format!("{base}{WELL_KNOWN}"))
        .map_err(|e| ProbeError::new(ErrorClass::Local, e))
}

/// Parses a configuration fetched from `from` (named in messages).
pub fn parse(from: &str, body: &[u8]) -> Result<Config, ProbeError> {
    let invalid = |why: String| {
        ProbeError::new(
            ErrorClass::Protocol,
            format!("networkQuality configuration at {from} is not usable: {why}"),
        )
    };
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("not JSON ({e}); is this a networkQuality server?")))?;
    if let Some(version) = json.get("version") {
        if version.as_u64() != Some(1) {
            return Err(invalid(format!(
                "version {version}, this agent reads version 1"
            )));
        }
    }
    let urls = json
        .get("urls")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("no `urls` object".into()))?;
    let url = |draft: &str, apple: &str| -> Result<HttpUrl, ProbeError> {
        let text = urls
            .get(draft)
            .or_else(|| urls.get(apple))
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("no `urls.{draft}` (nor Apple's `urls.{apple}`)")))?;
        HttpUrl::parse(text).map_err(|e| invalid(format!("`{draft}`: {e}")))
    };
    let config = Config {
        large: url("large_download_url", "large_https_download_url")?,
        small: url("small_download_url", "small_https_download_url")?,
        upload: url("upload_url", "https_upload_url")?,
        test_endpoint: json
            .get("test_endpoint")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    };
    let origin = |u: &HttpUrl| (u.https(), u.host(), u.port());
    if origin(&config.large) != origin(&config.small)
        || origin(&config.large) != origin(&config.upload)
    {
        return Err(invalid(
            "its three URLs are not on the same scheme, host and port (draft section 8.1)".into(),
        ));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_url_of_base_and_well_known() {
        let u = |s: &str| config_url(s).unwrap().url.to_string();
        assert_eq!(u("http://t:8080"), "http://t:8080/.well-known/nq");
        assert_eq!(
            u("http://t:8080/speed/"),
            "http://t:8080/speed/.well-known/nq"
        );
        assert_eq!(
            u("https://mensura.cdn-apple.com/.well-known/nq"),
            "https://mensura.cdn-apple.com/.well-known/nq"
        );
    }

    #[test]
    fn both_key_sets_and_missing_urls() {
        let apple = br#"{"version":1,"urls":{"small_https_download_url":"https://a/s",
            "large_https_download_url":"https://a/l","https_upload_url":"https://a/u"}}"#;
        let c = parse("x", apple).unwrap();
        assert_eq!(c.large.url.path(), "/l");
        let draft = br#"{"version":1,"urls":{"small_download_url":"http://a/s",
            "large_download_url":"http://a/l","upload_url":"http://a/u"},"test_endpoint":"b"}"#;
        let c = parse("x", draft).unwrap();
        assert_eq!(c.test_endpoint.as_deref(), Some("b"));
        let missing = br#"{"version":1,"urls":{"small_download_url":"http://a/s",
            "large_download_url":"http://a/l"}}"#;
        let e = parse("x", missing).unwrap_err();
        assert_eq!(e.class, ErrorClass::Protocol);
        assert!(e.message.contains("upload_url"), "{}", e.message);
        let hosts = br#"{"urls":{"small_download_url":"http://a/s",
            "large_download_url":"http://b/l","upload_url":"http://a/u"}}"#;
        assert_eq!(parse("x", hosts).unwrap_err().class, ErrorClass::Protocol);
        assert_eq!(
            parse("x", b"<html>").unwrap_err().class,
            ErrorClass::Protocol
        );
    }
}
