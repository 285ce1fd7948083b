//! Holding something for exactly as long as a call lasts: [`HoldLayer`] takes a guard from
//! each request and keeps it until the call's response has been sent (or dropped). How a
//! call keeps its memory budget and its place among its connection's calls.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Takes a guard from each request with `take` (which may also change the request) and
/// holds it until the response has been sent.
#[derive(Clone, Debug)]
pub struct HoldLayer<F> {
    take: F,
}

impl<F> HoldLayer<F> {
    pub fn new(take: F) -> HoldLayer<F> {
        HoldLayer { take }
    }
}

impl<S, F: Clone> tower::Layer<S> for HoldLayer<F> {
    type Service = Held<S, F>;

    fn layer(&self, inner: S) -> Held<S, F> {
        Held {
            inner,
            take: self.take.clone(),
        }
    }
}

/// See [`HoldLayer`].
#[derive(Clone, Debug)]
pub struct Held<S, F> {
    inner: S,
    take: F,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, F, G> tower::Service<http::Request<tonic::body::Body>> for Held<S, F>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    F: FnMut(&mut http::Request<tonic::body::Body>) -> G,
    G: Unpin + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let guard = (self.take)(&mut request);
        let response = self.inner.call(request);
        Box::pin(async move { Ok(holding(response.await?, guard)) })
    }
}

/// `inner`, holding `guard` until it is dropped.
#[derive(Debug)]
pub struct Holding<G> {
    inner: tonic::body::Body,
    _guard: G,
}

/// The body of `response`, holding `guard` until it has been sent.
fn holding<G: Unpin + Send + 'static>(
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
