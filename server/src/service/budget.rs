//! The memory budget of requests in flight: a server-wide count of bytes that every request
//! message takes from before it is buffered until its call's response has been sent. The
//! size of each message is in its gRPC frame header, so the budget is taken as the header
//! passes, before tonic reserves room for the message or reads a byte of it; a message
//! the budget cannot hold is refused at once with RESOURCE_EXHAUSTED, whatever the number
//! of connections and streams it came on.
//!
//! Reading the frames, it also refuses, as the caller's fault (INVALID_ARGUMENT), a body
//! that ends in the middle of a message and a compression flag that does not exist.
//!
//! A message is charged twice its size: its bytes, and what they decode into. A stream
//! (a bulk load) keeps only its last [`MESSAGES_HELD_PER_STREAM`] messages charged: the
//! handler holds no more chunks than that at once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The messages of one call the budget holds at once: a unary call has one; the bulk-load
/// handler holds the chunk being received, the ones being decided ahead, and the one being
/// made durable.
pub const MESSAGES_HELD_PER_STREAM: usize = super::backfill::CHUNKS_PREPARED_AHEAD + 2;
/// Bytes of a gRPC message's frame header: a compression flag and a big-endian length.
const FRAME_HEADER_BYTES: usize = 5;

/// The bytes the requests in flight may hold, server-wide.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    bytes: Arc<Semaphore>,
    bytes_max: usize,
}

impl MemoryBudget {
    pub fn new(bytes_max: usize) -> MemoryBudget {
        let bytes_max = bytes_max.min(Semaphore::MAX_PERMITS);
        MemoryBudget {
            bytes: Arc::new(Semaphore::new(bytes_max)),
            bytes_max,
        }
    }

    /// Bytes taken right now.
    pub fn in_use(&self) -> usize {
        self.bytes_max - self.bytes.available_permits()
    }

    /// What a message of `length` bytes is charged.
    fn charge(length: usize) -> usize {
        2 * (length + FRAME_HEADER_BYTES)
    }
}

impl MemoryBudget {
    /// Charges every request's messages to the budget, for as long as its call lasts.
    pub fn layer(
        &self,
    ) -> crate::body::HoldLayer<
        impl FnMut(&mut http::Request<tonic::body::Body>) -> Held + Clone + use<>,
    > {
        let budget = self.clone();
        crate::body::HoldLayer::new(move |request: &mut http::Request<tonic::body::Body>| {
            let held: Held = Arc::default();
            let body = std::mem::take(request.body_mut());
            *request.body_mut() = tonic::body::Body::new(ChargedBody {
                inner: body,
                budget: budget.clone(),
                held: Arc::clone(&held),
                header: [0; FRAME_HEADER_BYTES],
                header_bytes: 0,
                payload_left: 0,
            });
            held
        })
    }
}

/// The budget a call holds, released when the last of its request body and its response
/// body is dropped.
type Held = Arc<Mutex<VecDeque<OwnedSemaphorePermit>>>;

/// A request body that charges each message to the budget as its frame header passes.
#[derive(Debug)]
pub struct ChargedBody<B> {
    inner: B,
    budget: MemoryBudget,
    held: Held,
    /// The frame header being read, which may span data frames.
    header: [u8; FRAME_HEADER_BYTES],
    header_bytes: usize,
    /// Bytes of the current message still to pass.
    payload_left: usize,
}

impl<B> ChargedBody<B> {
    /// Reads the frame headers in `data` and charges their messages; fails when the
    /// budget cannot hold one.
    fn charge(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let passed = self.payload_left.min(data.len());
                self.payload_left -= passed;
                data.advance(passed);
                continue;
            }
            let wanted = FRAME_HEADER_BYTES - self.header_bytes;
            let taken = wanted.min(data.len());
            self.header[self.header_bytes..self.header_bytes + taken]
                .copy_from_slice(&data[..taken]);
            self.header_bytes += taken;
            data.advance(taken);
            if self.header_bytes < FRAME_HEADER_BYTES {
                return Ok(());
            }
            self.header_bytes = 0;
            if self.header[0] > 1 {
                // Only "uncompressed" (0) and "compressed" (1) exist.
                return Err(tonic::Status::invalid_argument(format!(
                    "a message's compression flag is {}; only 0 and 1 exist",
                    self.header[0]
                )));
            }
            let length = u32::from_be_bytes(
                self.header[1..]
                    .try_into()
                    .expect("four bytes of a five-byte header"),
            ) as usize;
            self.payload_left = length;
            let charge = MemoryBudget::charge(length);
            let permit = u32::try_from(charge)
                .ok()
                .and_then(|charge| {
                    Arc::clone(&self.budget.bytes)
                        .try_acquire_many_owned(charge)
                        .ok()
                })
                .ok_or_else(|| {
                    // Counted by code among the calls; a log line each would flood.
                    tracing::debug!(
                        message_bytes = length,
                        in_use_bytes = self.budget.in_use(),
                        budget_bytes = self.budget.bytes_max,
                        "request refused: over the memory budget of requests in flight"
                    );
                    tonic::Status::resource_exhausted(format!(
                        "the server holds {} bytes of requests in flight, and a message of \
                         {length} bytes does not fit in its budget of {} \
                         (limits.request_bytes_in_flight_max); retry later",
                        self.budget.in_use(),
                        self.budget.bytes_max
                    ))
                })?;
            let mut held = self.held.lock();
            held.push_back(permit);
            while held.len() > MESSAGES_HELD_PER_STREAM {
                held.pop_front();
            }
        }
        Ok(())
    }
}

impl<B> Body for ChargedBody<B>
where
    B: Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.charge(data)
                {
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) if this.header_bytes > 0 || this.payload_left > 0 => {
                this.header_bytes = 0;
                this.payload_left = 0;
                Poll::Ready(Some(Err(Box::new(tonic::Status::invalid_argument(
                    "the request body ends in the middle of a message",
                )))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
