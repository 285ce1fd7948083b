//! A tower layer that lets a call through or answers it at once, before its body is read:
//! the shape of authentication ([`crate::auth`]) and of the server while it starts
//! ([`crate::health`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Decides whether a call goes on.
pub trait Gate: Clone {
    /// Lets `request` through (possibly adding to its extensions), or refuses it with the
    /// status its caller gets.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status>;
}

/// Puts a [`Gate`] in front of every call.
#[derive(Clone, Debug)]
pub struct GateLayer<G> {
    gate: G,
}

impl<G> GateLayer<G> {
    pub fn new(gate: G) -> GateLayer<G> {
        GateLayer { gate }
    }
}

impl<S, G: Clone> tower::Layer<S> for GateLayer<G> {
    type Service = Gated<S, G>;

    fn layer(&self, inner: S) -> Gated<S, G> {
        Gated {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// See [`GateLayer`].
#[derive(Clone, Debug)]
pub struct Gated<S, G> {
    inner: S,
    gate: G,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, G, B, ResBody> tower::Service<http::Request<B>> for Gated<S, G>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    G: Gate,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.gate.admit(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}
