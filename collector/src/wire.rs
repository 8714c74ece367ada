//! The Ingest service on the wire: the gRPC route and the codec that bounds what one
//! message may cost in memory before it is decoded.
//!
//! prost decodes eagerly, and a message's encoded size says little about its decoded
//! size: an empty `Result` is 2 bytes on the wire and a few hundred in memory, so 4 MiB of
//! them would decode to more than a gigabyte. `BoundedCodec` scans the bytes of each
//! `AgentMessage` first (a walk over the wire format, no allocation) and refuses, with
//! INVALID_ARGUMENT, a batch of more than `MAX_BATCH_RESULTS` results or a message whose
//! estimated decoded size passes `MAX_DECODED_BYTES`; only then does prost decode it.
//! Bytes the scan cannot follow are left to prost, which refuses them as before.
//!
//! `IngestServer` is the route the generated `ingest_server::IngestServer` would be, with
//! this codec in place of tonic-prost's (the generated one has its codec built in).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::mem::size_of;
use std::sync::Arc;
use std::task::{Context, Poll};

use edgeprobe_proto::bounds::MAX_BATCH_RESULTS;
use edgeprobe_proto::v1 as pb;
use edgeprobe_proto::v1::ingest_server::Ingest;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::Status;

/// Estimated memory one decoded message may take, at most. The largest valid batch
/// (10,000 results of 32 labels each in a 4 MiB message) estimates at about 30 MiB.
pub const MAX_DECODED_BYTES: usize = 48 << 20;
/// What a map entry (a label) costs decoded beyond its bytes: two `String`s and the
/// hash table's share.
const LABEL_COST: usize = 2 * size_of::<String>() + 16;
const RESULT_COST: usize = size_of::<pb::Result>();

/// What the scan of a message found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    results: usize,
    labels: usize,
}

impl Counts {
    fn decoded_estimate(&self, encoded: usize) -> usize {
        encoded
            .saturating_add(self.results.saturating_mul(RESULT_COST))
            .saturating_add(self.labels.saturating_mul(LABEL_COST))
    }
}

/// Refuses a message whose decoded form would be too large; `Ok` for anything it cannot
/// follow (prost refuses that).
pub fn check(bytes: &[u8]) -> Result<(), Status> {
    let Some(counts) = scan_agent_message(bytes) else {
        return Ok(());
    };
    if counts.results > MAX_BATCH_RESULTS {
        return Err(Status::invalid_argument(format!(
            "batch of {} results, at most {MAX_BATCH_RESULTS} (refused before decoding)",
            counts.results
        )));
    }
    let estimate = counts.decoded_estimate(bytes.len());
    if estimate > MAX_DECODED_BYTES {
        return Err(Status::invalid_argument(format!(
            "message would take about {} MiB decoded ({} results, {} labels in {} bytes), at most {} MiB (refused before decoding)",
            estimate >> 20,
            counts.results,
            counts.labels,
            bytes.len(),
            MAX_DECODED_BYTES >> 20
        )));
    }
    Ok(())
}

/// One field of a message: its number and, for length-delimited fields, its bytes.
struct Field<'a> {
    number: u64,
    bytes: Option<&'a [u8]>,
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Walks the fields of one message; `None` on bytes that are not the wire format.
fn fields<'a>(mut buf: &'a [u8], mut each: impl FnMut(Field<'a>) -> Option<()>) -> Option<()> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = key >> 3;
        let bytes = match key & 7 {
            0 => {
                varint(&mut buf)?;
                None
            }
            1 => {
                buf = buf.get(8..)?;
                None
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let (field, rest) = (buf.get(..len)?, buf.get(len..)?);
                buf = rest;
                Some(field)
            }
            5 => {
                buf = buf.get(4..)?;
                None
            }
            _ => return None,
        };
        each(Field { number, bytes })?;
    }
    Some(())
}

/// Counts the results and labels of an `AgentMessage` (field numbers from edgeprobe.proto).
fn scan_agent_message(buf: &[u8]) -> Option<Counts> {
    let mut counts = Counts::default();
    fields(buf, |f| {
        match (f.number, f.bytes) {
            // Hello.labels
            (1, Some(hello)) => fields(hello, |h| {
                counts.labels += usize::from(h.number == 3);
                Some(())
            })?,
            // ResultBatch.results; a repeated oneof field merges, so every copy counts.
            (2, Some(batch)) => fields(batch, |b| {
                if let (1, Some(result)) = (b.number, b.bytes) {
                    counts.results += 1;
                    // Result.labels
                    fields(result, |r| {
                        counts.labels += usize::from(r.number == 11);
                        Some(())
                    })?;
                }
                Some(())
            })?,
            _ => {}
        }
        Some(())
    })?;
    Some(counts)
}

/// prost encoding of what the collector sends; scanned, bounded prost decoding of what
/// agents send.
pub struct BoundedCodec<E, D>(PhantomData<(E, D)>);

impl<E, D> Default for BoundedCodec<E, D> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

pub struct ProstEncoder<E>(PhantomData<E>);
pub struct BoundedDecoder<D>(PhantomData<D>);

impl<E: Message + Send + 'static, D: Message + Default + Send + 'static> Codec
    for BoundedCodec<E, D>
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = BoundedDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

impl<E: Message> Encoder for ProstEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encode: {e}")))
    }
}

impl<D: Message + Default> Decoder for BoundedDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        use bytes::Buf;
        // tonic hands over one whole message in one contiguous buffer.
        if buf.chunk().len() == buf.remaining() {
            check(buf.chunk())?;
        } else {
            let whole = buf.copy_to_bytes(buf.remaining());
            check(&whole)?;
            return D::decode(whole)
                .map(Some)
                .map_err(|e| Status::internal(format!("failed to decode message: {e}")));
        }
        D::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("failed to decode message: {e}")))
    }
}

/// The `/edgeprobe.v1.Ingest/Stream` route with `BoundedCodec`.
pub struct IngestServer<T> {
    inner: Arc<T>,
    max_decoding: usize,
    max_encoding: usize,
}

impl<T> Clone for IngestServer<T> {
    fn clone(&self) -> Self {
        IngestServer {
            inner: self.inner.clone(),
            max_decoding: self.max_decoding,
            max_encoding: self.max_encoding,
        }
    }
}

impl<T> IngestServer<T> {
    pub fn new(inner: T, max_decoding: usize, max_encoding: usize) -> Self {
        IngestServer {
            inner: Arc::new(inner),
            max_decoding,
            max_encoding,
        }
    }
}

impl<T> tonic::server::NamedService for IngestServer<T> {
    const NAME: &'static str = pb::ingest_server::SERVICE_NAME;
}

struct StreamSvc<T>(Arc<T>);

impl<T: Ingest> tonic::server::StreamingService<pb::AgentMessage> for StreamSvc<T> {
    type Response = pb::CollectorMessage;
    type ResponseStream = T::StreamStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
    ) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream(request).await })
    }
}

impl<T, B> Service<http::Request<B>> for IngestServer<T>
where
    T: Ingest,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/edgeprobe.v1.Ingest/Stream" {
            return Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            });
        }
        let method = StreamSvc(self.inner.clone());
        let (decoding, encoding) = (self.max_decoding, self.max_encoding);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BoundedCodec::<
                pb::CollectorMessage,
                pb::AgentMessage,
            >::default())
            .apply_max_message_size_config(Some(decoding), Some(encoding));
            Ok(grpc.streaming(method, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(results: Vec<pb::Result>) -> Vec<u8> {
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Batch(pb::ResultBatch { results })),
        }
        .encode_to_vec()
    }

    #[test]
    fn the_scan_counts_what_prost_would_decode() {
        let labelled = pb::Result {
            seq: 7,
            test: "web".into(),
            labels: [("a".to_string(), "1".to_string()), ("b".into(), "".into())].into(),
            ..Default::default()
        };
        let bytes = batch(vec![labelled, pb::Result::default(), pb::Result::default()]);
        assert_eq!(
            scan_agent_message(&bytes),
            Some(Counts {
                results: 3,
                labels: 2
            })
        );
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                agent_id: "a1".into(),
                labels: [("site".to_string(), "lab".to_string())].into(),
                ..Default::default()
            })),
        }
        .encode_to_vec();
        assert_eq!(
            scan_agent_message(&hello),
            Some(Counts {
                results: 0,
                labels: 1
            })
        );
        // Garbage is left to prost.
        assert_eq!(scan_agent_message(&[0xff, 0xff]), None);
        assert!(check(&[0x12, 0x7f]).is_ok());
    }

    #[test]
    fn near_empty_results_are_refused_before_decoding() {
        // 4 MiB of empty results: two bytes each on the wire.
        let bytes = batch(vec![pb::Result::default(); (4 << 20) / 2 - 8]);
        assert!(bytes.len() <= 4 << 20);
        let status = check(&bytes).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("at most 10000"), "{status:?}");
        assert!(check(&batch(vec![pb::Result::default(); MAX_BATCH_RESULTS])).is_ok());

        // One result with two million empty labels.
        let mut labels = Vec::new();
        for _ in 0..2_000_000 {
            labels.extend_from_slice(&[0x5a, 0x00]); // field 11, length 0
        }
        let mut result = vec![0x0a];
        prost::encoding::encode_varint(labels.len() as u64, &mut result);
        result.extend_from_slice(&labels);
        let mut message = vec![0x12];
        prost::encoding::encode_varint(result.len() as u64, &mut message);
        message.extend_from_slice(&result);
        let status = check(&message).unwrap_err();
        assert!(status.message().contains("2000000 labels"), "{status:?}");
    }

    #[test]
    fn the_largest_valid_batch_passes() {
        let labels: std::collections::HashMap<String, String> =
            (0..32).map(|i| (format!("k{i}"), "v".into())).collect();
        let full = pb::Result {
            labels,
            ..Default::default()
        };
        let counts = Counts {
            results: MAX_BATCH_RESULTS,
            labels: MAX_BATCH_RESULTS * 32,
        };
        assert!(counts.decoded_estimate(4 << 20) < MAX_DECODED_BYTES);
        assert!(check(&batch(vec![full; 1000])).is_ok());
    }
}
