//! A tower layer that lets a call through or answers it at once, before its body is read:
//! the shape of the content-type check ([`GrpcContentType`]), of authentication
//! ([`crate::service::auth`]) and of the server while it starts ([`crate::service::health`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Decides whether a call goes on.
pub trait Gate: Clone {
    /// The HTTP status of a refusal; a gRPC refusal is an HTTP success carrying its status.
    const REFUSAL_HTTP_STATUS: http::StatusCode = http::StatusCode::OK;

    /// Lets `request` through (possibly adding to its extensions), or refuses it with the
    /// status its caller gets.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status>;
}

/// Lets through only what is gRPC with protobuf messages, by its content type: anything
/// else is answered HTTP 415 (Unsupported Media Type), as the gRPC protocol asks, so that
/// no other HTTP/2 client takes an error for a success. The answer also carries
/// INVALID_ARGUMENT for a gRPC client that sent, say, `application/grpc+json`.
#[derive(Clone, Copy, Debug)]
pub struct GrpcContentType;

impl Gate for GrpcContentType {
    const REFUSAL_HTTP_STATUS: http::StatusCode = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;

    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status> {
        let content_type = request.headers().get(http::header::CONTENT_TYPE);
        let media_type = content_type
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or(value).trim());
        match media_type {
            Some(media_type)
                if media_type.eq_ignore_ascii_case("application/grpc")
                    || media_type.eq_ignore_ascii_case("application/grpc+proto") =>
            {
                Ok(())
            }
            _ => Err(tonic::Status::invalid_argument(format!(
                "content-type {:?} is not supported: send application/grpc (protobuf messages)",
                content_type.map_or("(none)", |value| value.to_str().unwrap_or("(not text)"))
            ))),
        }
    }
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
            Err(status) => {
                let mut response = status.into_http();
                *response.status_mut() = G::REFUSAL_HTTP_STATUS;
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}
