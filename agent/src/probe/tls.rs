//! TLS for probes (tcp and http): a rustls client config that either verifies against the
//! bundled web PKI roots or, with `insecure_tls`, accepts any certificate. Either way the
//! peer's leaf certificate is read afterwards for its expiry.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{ErrorClass, ProbeError};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client config for probes; `alpn` is empty, `[b"http/1.1"]` or `[b"h2"]` (one cached
/// config each, so any other list must start as one of these).
pub fn client_config(insecure: bool, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    static VERIFIED: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    static INSECURE: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    static VERIFIED_H1: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    static INSECURE_H1: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    static VERIFIED_H2: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    static INSECURE_H2: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    let h2 = alpn.first() == Some(&&b"h2"[..]);
    let slot = match (insecure, alpn.is_empty(), h2) {
        (false, true, _) => &VERIFIED,
        (true, true, _) => &INSECURE,
        (false, false, false) => &VERIFIED_H1,
        (true, false, false) => &INSECURE_H1,
        (false, false, true) => &VERIFIED_H2,
        (true, false, true) => &INSECURE_H2,
    };
    slot.get_or_init(|| {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let mut config = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny))
                .with_no_client_auth()
        } else {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    })
    .clone()
}

/// Performs a TLS handshake; returns the stream, the handshake time and the seconds until
/// the leaf certificate expires (negative when expired).
pub async fn handshake<S>(
    tcp: S,
    host: &str,
    config: Arc<ClientConfig>,
) -> Result<(TlsStream<S>, Duration, Option<f64>), ProbeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        ProbeError::new(
            ErrorClass::Tls,
            format!("bad TLS server name `{host}`: {e}"),
        )
    })?;
    let start = Instant::now();
    let stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ProbeError::new(ErrorClass::Tls, format!("TLS handshake with {host}: {e}")))?;
    let took = start.elapsed();
    let expiry = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| cert_expiry_seconds(leaf.as_ref()));
    Ok((stream, took, expiry))
}

/// Seconds from now until the certificate's notAfter.
pub fn cert_expiry_seconds(der: &[u8]) -> Option<f64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let not_after = cert.validity().not_after.timestamp() as f64;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    Some(not_after - now)
}

/// Accepts any server certificate: `insecure_tls = true` only.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
