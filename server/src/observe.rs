//! Every call's request id, log span and metrics: a tower layer in front of all the
//! services (so refusals by the authenticator are counted and logged like the rest).
//!
//! The id is the caller's `x-request-id` when it sent a usable one, else a new one; it is
//! returned in the response's `x-request-id` and is a field of the `request` span that
//! every log line of the call is written in. The call is timed from its headers to the
//! end of its response body, whose trailers carry the status code.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tracing::Instrument;

use crate::metrics::{Method, Metrics, code_label};

/// The metadata key of the request id, both ways.
pub const REQUEST_ID: &str = "x-request-id";
/// Longest request id taken from a caller.
pub const REQUEST_ID_BYTES_MAX: usize = 128;

/// Put in every request's extensions: when its headers arrived, so that a handler can log
/// how long decoding its body took.
#[derive(Clone, Copy, Debug)]
pub struct Received(pub Instant);

/// Logs (at debug) the time from a call's headers to its decoded message: reading and
/// decoding the body, after the authenticator's check.
pub fn log_decoded<T>(request: &tonic::Request<T>) {
    if let Some(Received(at)) = request.extensions().get() {
        tracing::debug!(decode_us = at.elapsed().as_micros() as u64, "decoded");
    }
}

/// Put in a GetFeatures response's extensions by the handler: the read's batch size, so
/// that its time is also counted by batch-size bucket.
#[derive(Clone, Copy, Debug)]
pub struct ReadBatch(pub usize);

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct ObserveLayer {
    /// `None` when metrics are off: ids and spans only.
    metrics: Option<Arc<Metrics>>,
    /// Calls slower than this are logged at WARN.
    slow_request_threshold: Duration,
    ids: Arc<RequestIds>,
}

impl ObserveLayer {
    pub fn new(metrics: Option<Arc<Metrics>>, slow_request_threshold: Duration) -> ObserveLayer {
        ObserveLayer {
            metrics,
            slow_request_threshold,
            ids: Arc::new(RequestIds::new()),
        }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            layer: self.clone(),
        }
    }
}

/// Draws request ids: a hash of a per-process random seed and a counter, so ids are
/// unique without coordination and cost no system call.
#[derive(Debug)]
struct RequestIds {
    seed: u64,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        let mut seed = [0; 8];
        // Without randomness ids are still unique within the process.
        let _ = getrandom::fill(&mut seed);
        RequestIds {
            seed: u64::from_le_bytes(seed),
            next: AtomicU64::new(0),
        }
    }

    /// The caller's id when usable (1 to 128 characters of letters, digits and `-_.:/`),
    /// else a new one.
    fn of<B>(&self, request: &http::Request<B>) -> http::HeaderValue {
        if let Some(id) = request.headers().get(REQUEST_ID)
            && is_usable_request_id(id.as_bytes())
        {
            return id.clone();
        }
        let count = self.next.fetch_add(1, Ordering::Relaxed);
        let id = xxhash_rust::xxh3::xxh3_64_with_seed(&count.to_le_bytes(), self.seed);
        let mut hex = [0u8; 16];
        for (place, digit) in hex.iter_mut().rev().enumerate() {
            *digit = b"0123456789abcdef"[((id >> (place * 4)) & 0xf) as usize];
        }
        http::HeaderValue::from_bytes(&hex).expect("hex digits are a valid header")
    }
}

fn is_usable_request_id(id: &[u8]) -> bool {
    (1..=REQUEST_ID_BYTES_MAX).contains(&id.len())
        && id
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || b"-_.:/".contains(&byte))
}

/// See [`ObserveLayer`].
#[derive(Clone, Debug)]
pub struct Observed<S> {
    inner: S,
    layer: ObserveLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Observed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = crate::clock::monotonic_now();
        request.extensions_mut().insert(Received(started));
        let id = self.layer.ids.of(&request);
        let path = request.uri().path();
        // Displayed, not debug-formatted: neither needs escaping (an id is made of letters,
        // digits and `-_.:/`, a path is a URI's), and the span's fields are formatted for
        // every call.
        let span = tracing::info_span!(
            "request",
            request_id = %id.to_str().unwrap_or_default(),
            method = %path,
        );
        let finish = Finish {
            metrics: self
                .layer
                .metrics
                .as_ref()
                .map(|metrics| (Arc::clone(metrics), metrics.method(path))),
            slow_request_threshold: self.layer.slow_request_threshold,
            span: span.clone(),
            started,
            answered: started,
            read_batch: None,
        };
        let response = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let mut response = response.await?;
            response.headers_mut().insert(REQUEST_ID, id);
            let mut finish = finish;
            finish.answered = crate::clock::monotonic_now();
            finish.read_batch = response
                .extensions()
                .get::<ReadBatch>()
                .map(|batch| batch.0);
            // An error answered at once has its status in the headers (no body follows);
            // otherwise the status comes in the body's trailers.
            if let Some(code) = grpc_status(response.headers()) {
                finish.done(code);
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(ObservedBody {
                    body,
                    finish: Some(finish),
                })
            }))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let code = headers.get("grpc-status")?;
    let code: i32 = std::str::from_utf8(code.as_bytes()).ok()?.parse().ok()?;
    Some(tonic::Code::from(code))
}

/// What is recorded when a call ends.
struct Finish {
    metrics: Option<(Arc<Metrics>, Method)>,
    slow_request_threshold: Duration,
    span: tracing::Span,
    started: Instant,
    /// When the handler returned its answer; from then on the body is encoded and sent.
    answered: Instant,
    read_batch: Option<usize>,
}

impl Finish {
    fn done(self, code: tonic::Code) {
        let duration = self.started.elapsed();
        if let Some((metrics, method)) = &self.metrics {
            metrics.request(method, code, duration);
            if let (Some(keys), tonic::Code::Ok) = (self.read_batch, code) {
                metrics.read_duration(keys, duration);
            }
        }
        let code = code_label(code);
        let duration_us = duration.as_micros() as u64;
        // Encoding the answer and handing it to the connection.
        let respond_us = self.answered.elapsed().as_micros() as u64;
        let keys = self.read_batch;
        if duration > self.slow_request_threshold {
            tracing::warn!(parent: &self.span, code, duration_us, respond_us, keys, "slow request");
        } else {
            tracing::debug!(parent: &self.span, code, duration_us, respond_us, keys, "request finished");
        }
    }
}

/// A response body that records its call when its trailers pass, or when it is dropped
/// before them (the caller went away: CANCELLED).
struct ObservedBody {
    body: tonic::body::Body,
    finish: Option<Finish>,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(context);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|trailers| grpc_status(trailers).unwrap_or(tonic::Code::Unknown)),
            Poll::Ready(Some(Err(status))) => Some(status.code()),
            Poll::Ready(None) => Some(tonic::Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(finish) = self.finish.take()
        {
            finish.done(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.done(tonic::Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_request_id_is_kept_only_when_it_is_usable() {
        assert!(is_usable_request_id(b"ranker-7f3a:batch/12"));
        assert!(!is_usable_request_id(b""));
        assert!(!is_usable_request_id(b"has space"));
        assert!(!is_usable_request_id(b"line\nbreak"));
        assert!(!is_usable_request_id(&[b'a'; REQUEST_ID_BYTES_MAX + 1]));
        assert!(is_usable_request_id(&[b'a'; REQUEST_ID_BYTES_MAX]));
    }

    #[test]
    fn new_request_ids_differ() {
        let ids = RequestIds::new();
        let request = http::Request::new(());
        let first = ids.of(&request);
        let second = ids.of(&request);
        assert_ne!(first, second);
        assert_eq!(first.len(), 16);
        // The hash of the counter, in hexadecimal.
        let known = RequestIds {
            seed: 7,
            next: AtomicU64::new(3),
        };
        let expected = xxhash_rust::xxh3::xxh3_64_with_seed(&3u64.to_le_bytes(), 7);
        assert_eq!(known.of(&request), format!("{expected:016x}").as_str());
    }
}
