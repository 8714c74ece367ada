//! How a session ends (`SessionEnd`): classified once, where a collector's status
//! arrives (`SessionEnd::from_status`), and matched by the reconnect loop without
//! downcasts. An identity conflict is known by the status metadata
//! (`edgeprobe_proto::REASON_KEY` = `REASON_IDENTITY_CONFLICT`), never by the words of
//! its message, which stays prose for people (and for agents of the previous release).

use crate::buffer::BufferError;

/// Why a session ended. A status from the collector is classified once, where it
/// arrives (`from_status`); the reconnect loop matches the variant.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The uplink is shutting down (or the buffer stopped): not an error.
    #[error("shutting down")]
    Shutdown,
    /// Another incarnation of this agent id is connected: the collector's status carries
    /// `edgeprobe_proto::REASON_IDENTITY_CONFLICT` in its metadata. A refusal too.
    #[error("identity conflict: {}", .0.message())]
    IdentityConflict(tonic::Status),
    /// The collector refused the session with a status it will give again
    /// (`is_refusal_code`): reconnecting at once would only loop.
    #[error("{}", status_text(.0))]
    Refused(tonic::Status),
    /// The collector is stopping (SIGTERM) and said so: an UNAVAILABLE whose metadata
    /// carries `edgeprobe_proto::REASON_SHUTDOWN`, after its committed batches were acked.
    /// Not a failure: the uplink reconnects at once, with its spread, backoff not grown.
    #[error("the collector is shutting down")]
    CollectorStopping(tonic::Status),
    /// Any other status: the stream or the collector went away.
    #[error("{}", status_text(.0))]
    Lost(tonic::Status),
    /// The endpoint could not be set up or reached.
    #[error("cannot connect to {endpoint}")]
    Transport {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The mTLS files of `[collector]` are missing or unreadable.
    #[error("[collector] {what} is not set")]
    CredentialUnset { what: &'static str },
    #[error("cannot read {what} {}", path.display())]
    Credential {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The outbound stream closed under the uplink.
    #[error("stream closed")]
    Closed,
    /// The collector broke the protocol (no welcome, an unexpected message, an ack past
    /// what was sent) or ended the stream.
    #[error("{0}")]
    Protocol(String),
    #[error("the buffer failed")]
    Buffer(#[from] BufferError),
}

impl SessionEnd {
    /// Classifies a status from the collector.
    pub fn from_status(status: tonic::Status) -> SessionEnd {
        if is_identity_conflict(&status) {
            SessionEnd::IdentityConflict(status)
        } else if is_shutdown(&status) {
            SessionEnd::CollectorStopping(status)
        } else if is_refusal_code(status.code()) {
            SessionEnd::Refused(status)
        } else {
            SessionEnd::Lost(status)
        }
    }

    /// The collector refused the session and will refuse the same again.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            SessionEnd::Refused(_) | SessionEnd::IdentityConflict(_)
        )
    }
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// An error and its sources, ": "-separated, for one log line.
pub(super) fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Codes with which the collector refuses a session it will refuse again.
fn is_refusal_code(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::Unauthenticated
            | Code::ResourceExhausted
    )
}

/// Two live incarnations of this agent id: the collector refuses the second session with
/// FAILED_PRECONDITION and `edgeprobe-reason: identity-conflict` in the status metadata.
/// The message is prose for people and is not read.
fn is_identity_conflict(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && has_reason(status, edgeprobe_proto::REASON_IDENTITY_CONFLICT)
}

/// The collector ends every session with UNAVAILABLE and `edgeprobe-reason: shutdown` when
/// it stops on SIGTERM (`sessions::shutting_down` in the collector).
fn is_shutdown(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && has_reason(status, edgeprobe_proto::REASON_SHUTDOWN)
}

fn has_reason(status: &tonic::Status, reason: &str) -> bool {
    status
        .metadata()
        .get(edgeprobe_proto::REASON_KEY)
        .is_some_and(|v| v.as_bytes() == reason.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::codec::open_stream;
    use edgeprobe_proto::v1 as pb;

    /// The status the collector refuses a cloned host with (`sessions::Conflict::status`).
    fn conflict_status(message: &str) -> tonic::Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            edgeprobe_proto::REASON_KEY,
            tonic::metadata::MetadataValue::from_static(edgeprobe_proto::REASON_IDENTITY_CONFLICT),
        );
        tonic::Status::with_metadata(tonic::Code::FailedPrecondition, message, metadata)
    }

    #[test]
    fn refusals_are_told_from_trouble() {
        let refused = SessionEnd::from_status(tonic::Status::invalid_argument("result seq 1: bad"));
        assert!(matches!(refused, SessionEnd::Refused(_)) && refused.is_refusal());
        let denied = SessionEnd::from_status(tonic::Status::permission_denied("not yours"));
        assert!(denied.is_refusal());
        let down = SessionEnd::from_status(tonic::Status::unavailable("connection reset"));
        assert!(matches!(down, SessionEnd::Lost(_)) && !down.is_refusal());
        assert!(!SessionEnd::Protocol("collector closed the stream".into()).is_refusal());
        assert!(!SessionEnd::Closed.is_refusal());

        // The identity conflict is the metadata's reason, whatever the message says.
        let clone = SessionEnd::from_status(conflict_status("refused"));
        assert!(matches!(clone, SessionEnd::IdentityConflict(_)) && clone.is_refusal());
        // A FAILED_PRECONDITION whose words merely mention a conflict is a plain refusal.
        for words in [
            "identity conflict: agent r1 is connected with another incarnation",
            "two hosts use the agent id `r1` (a cloned image?): incarnation `bb` from \
             10.0.0.2:1 is refused while incarnation `aa` from 10.0.0.1:1 is connected",
            "migrating",
        ] {
            let end = SessionEnd::from_status(tonic::Status::failed_precondition(words));
            assert!(matches!(end, SessionEnd::Refused(_)), "{words}: {end:?}");
        }
        // The reason on another code is not a conflict either.
        let mut other = tonic::Status::unavailable("restarting");
        other.metadata_mut().insert(
            edgeprobe_proto::REASON_KEY,
            tonic::metadata::MetadataValue::from_static(edgeprobe_proto::REASON_IDENTITY_CONFLICT),
        );
        assert!(matches!(
            SessionEnd::from_status(other),
            SessionEnd::Lost(_)
        ));

        // A stopping collector: UNAVAILABLE with the shutdown reason, not a refusal.
        let mut stopping = tonic::Status::unavailable("the collector is shutting down");
        stopping.metadata_mut().insert(
            edgeprobe_proto::REASON_KEY,
            tonic::metadata::MetadataValue::from_static(edgeprobe_proto::REASON_SHUTDOWN),
        );
        let end = SessionEnd::from_status(stopping.clone());
        assert!(matches!(end, SessionEnd::CollectorStopping(_)) && !end.is_refusal());
        // The words alone, or the reason on another code, are a lost session.
        let words = tonic::Status::unavailable("the collector is shutting down");
        assert!(matches!(
            SessionEnd::from_status(words),
            SessionEnd::Lost(_)
        ));
        let mut refusal = tonic::Status::invalid_argument("bad");
        *refusal.metadata_mut() = stopping.metadata().clone();
        assert!(matches!(
            SessionEnd::from_status(refusal),
            SessionEnd::Refused(_)
        ));
    }

    /// A server that refuses every stream with `status`.
    struct Refuses(tonic::Status);

    #[tonic::async_trait]
    impl pb::ingest_server::Ingest for Refuses {
        type StreamStream = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<pb::CollectorMessage, tonic::Status>> + Send>,
        >;

        async fn stream(
            &self,
            _: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            Err(self.0.clone())
        }
    }

    /// How a real stream refused with `status` ends.
    async fn refused_with(status: tonic::Status) -> SessionEnd {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::ingest_server::IngestServer::new(Refuses(status)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
        match open_stream(channel, tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(_) => panic!("the stream was not refused"),
            Err(status) => SessionEnd::from_status(status),
        }
    }

    /// The reason crosses the wire in the status metadata; the message alone does not
    /// make a conflict.
    #[tokio::test]
    async fn the_identity_conflict_is_read_from_the_status_metadata() {
        let end = refused_with(conflict_status("two hosts use the agent id `r1`")).await;
        match end {
            SessionEnd::IdentityConflict(status) => {
                assert_eq!(status.message(), "two hosts use the agent id `r1`")
            }
            other => panic!("{other:?}"),
        }
        let end = refused_with(tonic::Status::failed_precondition(
            "identity conflict: incarnation bb is refused",
        ))
        .await;
        assert!(matches!(end, SessionEnd::Refused(_)), "{end:?}");
    }
}
