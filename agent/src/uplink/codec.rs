//! The uplink's side of the Ingest stream: `open_stream` with the message bound both
//! peers apply, and `UplinkCodec`, whose decoder tells an undecodable controller message
//! (known by its kind and id, `Incoming::Undecodable`, refused with a reason while the
//! session goes on) from an undecodable anything else (the stream ends, as with any
//! codec).

use edgeprobe_proto::bounds;
use edgeprobe_proto::v1 as pb;
use prost::Message;
use tonic::transport::Channel;

/// Opens the Ingest stream with `UplinkCodec` and the message bound both peers apply.
pub async fn open_stream(
    channel: Channel,
    outbound: impl tonic::IntoStreamingRequest<Message = pb::AgentMessage>,
) -> Result<tonic::Response<tonic::Streaming<Incoming>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(bounds::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(bounds::MAX_MESSAGE_BYTES);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the channel is not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/edgeprobe.v1.Ingest/Stream");
    grpc.streaming(outbound.into_streaming_request(), path, UplinkCodec)
        .await
}

/// What the uplink reads from a collector.
#[derive(Debug)]
pub enum Incoming {
    Message(pb::CollectorMessage),
    /// A controller message that did not decode, known by its kind and id.
    Undecodable {
        what: Controller,
        error: String,
    },
}

/// A controller message known by its kind and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    FleetTests { version: u64 },
    RunNow { run_id: u64 },
}

/// The answer refusing an undecodable controller message (logged), when its feature was
/// negotiated; `None` otherwise (no answer may be sent).
pub(super) fn refuse_undecodable(
    what: Controller,
    error: &str,
    fleet_tests: bool,
    run_now: bool,
) -> Option<pb::agent_message::Msg> {
    match what {
        Controller::FleetTests { version } if fleet_tests => {
            let reason = format!("the fleet tests message does not decode: {error}");
            tracing::warn!(
                version,
                "fleet tests refused, keeping the running set: {reason}"
            );
            Some(pb::agent_message::Msg::TestsApplied(pb::TestsApplied {
                version,
                error: bounds::fit_error_message(&reason).0,
            }))
        }
        Controller::RunNow { run_id } if run_now => {
            let reason = format!("the run-now message does not decode: {error}");
            tracing::warn!(run_id, "run-now refused: {reason}");
            Some(pb::agent_message::Msg::RunStatus(pb::RunStatus {
                run_id,
                state: pb::run_status::State::Refused as i32,
                reason: bounds::fit_error_message(&reason).0,
            }))
        }
        _ => {
            tracing::warn!("ignoring an undecodable {what:?} the collector's welcome did not announce: {error}");
            None
        }
    }
}

/// prost encoding of what the agent sends; decoding that tells an undecodable controller
/// message (refused, the stream goes on) from an undecodable anything else (the stream
/// ends, as with any codec).
#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkCodec;

pub struct UplinkEncoder;
pub struct UplinkDecoder;

impl tonic::codec::Codec for UplinkCodec {
    type Encode = pb::AgentMessage;
    type Decode = Incoming;
    type Encoder = UplinkEncoder;
    type Decoder = UplinkDecoder;

    fn encoder(&mut self) -> UplinkEncoder {
        UplinkEncoder
    }

    fn decoder(&mut self) -> UplinkDecoder {
        UplinkDecoder
    }
}

impl tonic::codec::Encoder for UplinkEncoder {
    type Item = pb::AgentMessage;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: pb::AgentMessage,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(format!("encode: {e}")))
    }
}

impl tonic::codec::Decoder for UplinkDecoder {
    type Item = Incoming;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Incoming>, tonic::Status> {
        use bytes::Buf;
        let bytes = buf.copy_to_bytes(buf.remaining());
        decode_incoming(&bytes).map(Some)
    }
}

/// One collector message's bytes: the message, an identified undecodable controller
/// message, or an error (ends the stream).
pub fn decode_incoming(bytes: &[u8]) -> Result<Incoming, tonic::Status> {
    match pb::CollectorMessage::decode(bytes) {
        Ok(m) => Ok(Incoming::Message(m)),
        Err(e) => match identify(bytes) {
            Some(what) => Ok(Incoming::Undecodable {
                what,
                error: e.to_string(),
            }),
            None => Err(tonic::Status::internal(format!(
                "failed to decode message: {e}"
            ))),
        },
    }
}

/// The kind and id of a controller message in undecodable bytes: the last top-level
/// FleetTests (field 3) or RunNow (field 4), with its field 1 (version, run id) when it is
/// there and not 0.
fn identify(mut bytes: &[u8]) -> Option<Controller> {
    let mut found = None;
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut bytes)?;
            }
            1 => bytes = bytes.get(8..)?,
            5 => bytes = bytes.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                // A truncated last field still names its kind.
                let inner = bytes.get(..len).unwrap_or(bytes);
                bytes = bytes.get(len..).unwrap_or_default();
                let id = first_varint_field(inner).filter(|&id| id != 0);
                found = match (field, id) {
                    (3, Some(version)) => Some(Controller::FleetTests { version }),
                    (4, Some(run_id)) => Some(Controller::RunNow { run_id }),
                    (3 | 4, None) => None,
                    _ => found,
                };
            }
            _ => return found,
        }
    }
    found
}

/// Field 1 of a message as a varint, if it can be read.
fn first_varint_field(mut bytes: &[u8]) -> Option<u64> {
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        match (key >> 3, key & 7) {
            (1, 0) => return varint(&mut bytes),
            (_, 0) => {
                varint(&mut bytes)?;
            }
            (_, 1) => bytes = bytes.get(8..)?,
            (_, 5) => bytes = bytes.get(4..)?,
            (_, 2) => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                bytes = bytes.get(len..)?;
            }
            _ => return None,
        }
    }
    None
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(value);
        }
    }
    None
}

pub(super) fn kind_name(msg: &pb::collector_message::Msg) -> &'static str {
    match msg {
        pb::collector_message::Msg::Welcome(_) => "Welcome",
        pb::collector_message::Msg::Ack(_) => "Ack",
        pb::collector_message::Msg::FleetTests(_) => "FleetTests",
        pb::collector_message::Msg::RunNow(_) => "RunNow",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every stream with `messages`, encoding up to the shared
    /// bound as the collector's route does (`collector/src/run.rs` `ingest_route`).
    struct Sends(Vec<pb::CollectorMessage>);

    #[tonic::async_trait]
    impl pb::ingest_server::Ingest for Sends {
        type StreamStream = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<pb::CollectorMessage, tonic::Status>> + Send>,
        >;

        async fn stream(
            &self,
            _: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let messages = self.0.clone().into_iter().map(Ok);
            Ok(tonic::Response::new(Box::pin(futures::stream::iter(
                messages,
            ))))
        }
    }

    /// A push whose whole message encodes to `bytes`.
    fn push_of(bytes: usize) -> pb::CollectorMessage {
        use prost::Message;
        let mut len = bytes - 16;
        loop {
            let m = pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::FleetTests(pb::FleetTests {
                    version: 1,
                    tests_toml: "#".repeat(len),
                })),
            };
            match m.encoded_len().cmp(&bytes) {
                std::cmp::Ordering::Equal => return m,
                std::cmp::Ordering::Less => len += 1,
                std::cmp::Ordering::Greater => len -= 1,
            }
        }
    }

    /// Issue 28 case 2: the agent decoded 1 MiB while the collector sent up to 4 MiB, so a
    /// big push ended every session. The agent's client (`open_stream`) now decodes the
    /// largest message the shared bound lets a collector send.
    #[tokio::test]
    async fn the_agent_decodes_the_largest_message_a_collector_may_send() {
        let largest = push_of(bounds::MAX_MESSAGE_BYTES);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    pb::ingest_server::IngestServer::new(Sends(vec![largest.clone()]))
                        .max_encoding_message_size(bounds::MAX_MESSAGE_BYTES),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
        let mut inbound = open_stream(channel, tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        match inbound.message().await {
            Ok(Some(Incoming::Message(m))) => assert_eq!(m, largest),
            other => panic!("the agent did not decode the largest message: {other:?}"),
        }
    }

    #[test]
    fn an_undecodable_controller_message_is_identified_to_be_refused() {
        let good = pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::FleetTests(pb::FleetTests {
                version: 300,
                tests_toml: "[[test]]\n".into(),
            })),
        }
        .encode_to_vec();
        assert!(matches!(decode_incoming(&good), Ok(Incoming::Message(_))));
        // The same with tests_toml not UTF-8: FleetTests version 300, refused.
        let mut bad = good.clone();
        let at = bad.iter().position(|&b| b == b'[').unwrap();
        bad[at] = 0xff;
        match decode_incoming(&bad) {
            Ok(Incoming::Undecodable { what, error }) => {
                assert_eq!(what, Controller::FleetTests { version: 300 });
                assert!(
                    error.contains("UTF-8") || error.contains("utf-8"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        let answer = refuse_undecodable(Controller::FleetTests { version: 300 }, "x", true, true);
        assert!(matches!(
            answer,
            Some(pb::agent_message::Msg::TestsApplied(pb::TestsApplied { version: 300, ref error }))
                if error.contains("does not decode")
        ));
        assert!(
            refuse_undecodable(Controller::FleetTests { version: 300 }, "x", false, true).is_none()
        );
        // A RunNow whose test name is not UTF-8.
        let mut run = pb::CollectorMessage {
            msg: Some(pb::collector_message::Msg::RunNow(pb::RunNow {
                run_id: 9,
                test: "web".into(),
                test_toml: String::new(),
                expires_unix_nanos: None,
            })),
        }
        .encode_to_vec();
        let at = run.iter().position(|&b| b == b'w').unwrap();
        run[at] = 0xc3;
        assert!(matches!(
            decode_incoming(&run),
            Ok(Incoming::Undecodable {
                what: Controller::RunNow { run_id: 9 },
                ..
            })
        ));
        // Anything else that does not decode ends the stream.
        assert!(decode_incoming(&[0x12, 0x05, 0x08]).is_err());
        assert!(decode_incoming(&[0xff; 12]).is_err());
    }
}
