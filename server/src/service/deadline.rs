//! The caller's gRPC deadline (the `grpc-timeout` header), kept for the request's task so
//! that no work starts once it has passed: tonic's own timeout answers the caller when the
//! deadline passes but cannot stop work already handed to the blocking pool, and a write
//! that went on after its caller was told it failed would be applied unbeknown to it.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::task::futures::TaskLocalFuture;

use crate::error::Error;

tokio::task_local! {
    static DEADLINE: Option<Instant>;
}

/// The current request's deadline, if its caller set one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok().flatten()
}

/// Refuses work for a request whose deadline has passed.
pub fn check() -> Result<(), Error> {
    match current() {
        Some(deadline) if crate::clock::monotonic_now() >= deadline => Err(Error::DeadlinePassed),
        _ => Ok(()),
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Runs every call inside the scope of its deadline, read before the body is decoded.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// See [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TaskLocalFuture<Option<Instant>, S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_timeout)
            .and_then(|timeout| crate::clock::monotonic_now().checked_add(timeout));
        DEADLINE.scope(deadline, self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, ServiceExt};

    use super::*;

    /// What a call's work sees of its deadline.
    async fn work_with(header: Option<&str>) -> Result<(), Error> {
        let service =
            DeadlineLayer.layer(tower::service_fn(move |_: http::Request<()>| async move {
                Ok::<_, std::convert::Infallible>(check())
            }));
        let mut request = http::Request::new(());
        if let Some(header) = header {
            request
                .headers_mut()
                .insert("grpc-timeout", header.parse().expect("ASCII"));
        }
        service.oneshot(request).await.expect("infallible")
    }

    #[tokio::test]
    async fn work_is_refused_once_the_callers_deadline_has_passed() {
        // A nanosecond has passed by the time any work runs.
        assert!(matches!(
            work_with(Some("1n")).await,
            Err(Error::DeadlinePassed)
        ));
        assert!(work_with(Some("10S")).await.is_ok());
        assert!(work_with(None).await.is_ok());
        assert!(work_with(Some("garbage")).await.is_ok());
        // Outside any call there is no deadline.
        assert!(check().is_ok());
    }

    #[test]
    fn grpc_timeouts_parse_by_unit_and_nonsense_does_not() {
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_timeout("1n"), Some(Duration::from_nanos(1)));
        for nonsense in ["", "S", "123456789S", "10s", "-1S", "1.5S", "10"] {
            assert_eq!(parse_timeout(nonsense), None, "{nonsense:?}");
        }
    }
}
