//! A response body that holds something until the response has been sent (or dropped):
//! how a call keeps its memory budget and its place among a connection's calls for exactly
//! as long as it lasts.

use std::pin::Pin;
use std::task::{Context, Poll};

/// `inner`, holding `guard` until it is dropped.
#[derive(Debug)]
pub struct Holding<G> {
    inner: tonic::body::Body,
    _guard: G,
}

/// The body of `response`, holding `guard` until it has been sent.
pub fn holding<G: Unpin + Send + 'static>(
    response: http::Response<tonic::body::Body>,
    guard: G,
) -> http::Response<tonic::body::Body> {
    response.map(|inner| {
        tonic::body::Body::new(Holding {
            inner,
            _guard: guard,
        })
    })
}

impl<G: Unpin> http_body::Body for Holding<G> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}
