//! The gRPC port's connections, from accept to close, with a limit on each resource a
//! caller can hold without doing anything:
//!
//! - **how many**: at most `limits.connections_max` open at once, itself kept within the
//!   process's descriptor limit ([`ConnectionLimits::within_descriptors`]). At the limit, a
//!   new connection makes room by closing the one idle for longest (no call in progress);
//!   when every one is busy, the new one is closed at once.
//! - **silence**: a connection must send the HTTP/2 preface within
//!   `limits.connection_preface_timeout` of being accepted (of its TLS handshake, which has
//!   `tls.handshake_timeout`); one that sends something else is closed at once.
//! - **idleness**: a connection without a call for `limits.connection_idle_timeout` is
//!   closed.
//! - **shutdown**: every idle connection is closed at once, and every other one as its
//!   last call ends ([`Connections::begin_shutdown`]); what is left at the end of the
//!   grace is closed ([`Connections::close_all`]).
//!
//! Closing a connection ends its reads: hyper then ends the connection. Calls are counted
//! per connection by [`calls_layer`], which finds the connection in the request's
//! [`ConnectionInfo`](crate::connection_info::ConnectionInfo).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::connection_info::{CallCount, ConnectionInfo};
use crate::tls::Tls;

/// The first bytes of every HTTP/2 connection, from the client.
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Connections in their TLS handshake or awaiting their preface at once; more wait in the
/// listen backlog (or make room, by the limit's rule, from the longest waiting).
const OPENING_AT_ONCE: usize = 256;
/// Descriptors kept for everything but connections and the database's files: the
/// listening sockets, the write-ahead and info logs, the ledger, the runtime's own.
const DESCRIPTORS_RESERVED: u64 = 128;
/// Fewer connections than this within the descriptor limit, and the server refuses to
/// start rather than serve a handful of callers.
const CONNECTIONS_MIN: usize = 16;

/// The limits of [`Connections`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub connections_max: usize,
    pub preface_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// Raises the process's soft descriptor limit to its hard limit, and keeps
    /// `connections_max` within what is left once the database's `max_open_files` and a
    /// reserve are set aside: a server that runs out of descriptors can accept no one.
    pub fn within_descriptors(mut self, database_files_max: i32) -> anyhow::Result<Self> {
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
        let descriptors = match rlimit::increase_nofile_limit(hard) {
            Ok(raised) => raised,
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the descriptor limit");
                soft
            }
        };
        if descriptors != soft {
            tracing::info!(from = soft, to = descriptors, "descriptor limit raised");
        }
        let database = u64::try_from(database_files_max).unwrap_or(0);
        let available = descriptors.saturating_sub(DESCRIPTORS_RESERVED + database);
        let available = usize::try_from(available).unwrap_or(usize::MAX);
        anyhow::ensure!(
            available >= CONNECTIONS_MIN,
            "the descriptor limit ({descriptors}) leaves room for {available} connections once \
             storage.max_open_files ({database_files_max}) and {DESCRIPTORS_RESERVED} others \
             are set aside: raise it (ulimit -n) or lower storage.max_open_files"
        );
        if self.connections_max > available {
            tracing::warn!(
                configured = self.connections_max,
                allowed = available,
                descriptors,
                "limits.connections_max lowered to fit the descriptor limit"
            );
            self.connections_max = available;
        }
        tracing::info!(
            connections_max = self.connections_max,
            descriptors,
            "connection limit"
        );
        Ok(self)
    }
}

/// Every connection the server holds.
#[derive(Debug)]
pub struct Connections {
    limits: ConnectionLimits,
    next_id: AtomicU64,
    /// The open connections, by id; one closed to make room leaves at once.
    open: Mutex<HashMap<u64, Arc<ConnectionState>>>,
    /// Cancelled when shutdown begins.
    shutdown: CancellationToken,
}

/// What the server knows of one connection.
#[derive(Debug)]
pub struct ConnectionState {
    id: u64,
    /// Calls in progress on it.
    calls: AtomicUsize,
    /// When its last call ended, or when it was accepted.
    idle_since: Mutex<Instant>,
    /// Cancelled to close it: its reads end.
    close: CancellationToken,
    /// The server's shutdown: when set, the connection closes as its last call ends.
    shutdown: CancellationToken,
    /// The task reading the connection, woken when its last call ends so that it starts
    /// counting the idle time.
    reader: Mutex<Option<Waker>>,
}

impl CallCount for ConnectionState {
    fn call_started(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }

    fn call_ended(&self) {
        if self.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.idle_since.lock() = crate::clock::tokio_now();
            if self.shutdown.is_cancelled() {
                self.close.cancel();
            }
            if let Some(reader) = self.reader.lock().take() {
                reader.wake();
            }
        }
    }
}

impl ConnectionState {
    fn is_idle(&self) -> bool {
        self.calls.load(Ordering::SeqCst) == 0
    }
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        })
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.open.lock().len()
    }

    /// Counts in a connection just accepted, making room at the limit by closing the
    /// connection idle for longest; `None` when every open connection is busy.
    fn open(self: &Arc<Self>) -> Option<Registration> {
        let mut open = self.open.lock();
        if open.len() >= self.limits.connections_max {
            let longest_idle = open
                .values()
                .filter(|state| state.is_idle())
                .min_by_key(|state| *state.idle_since.lock())
                .map(|state| state.id);
            let Some(victim) = longest_idle.and_then(|id| open.remove(&id)) else {
                tracing::debug!(
                    connections = open.len(),
                    "connection refused: at limits.connections_max, and none is idle"
                );
                return None;
            };
            tracing::debug!(
                connection = victim.id,
                "closing the longest idle connection to make room"
            );
            victim.close.cancel();
        }
        let state = Arc::new(ConnectionState {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            calls: AtomicUsize::new(0),
            idle_since: Mutex::new(crate::clock::tokio_now()),
            close: CancellationToken::new(),
            shutdown: self.shutdown.clone(),
            reader: Mutex::new(None),
        });
        if self.shutdown.is_cancelled() {
            state.close.cancel();
        }
        open.insert(state.id, Arc::clone(&state));
        Some(Registration {
            state,
            connections: Arc::clone(self),
        })
    }

    /// Shutdown begins: idle connections close now, the others as their last call ends.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
        for state in self.open.lock().values() {
            if state.is_idle() {
                state.close.cancel();
            }
        }
    }

    /// Closes every connection, busy or not: the end of the shutdown grace.
    pub fn close_all(&self) {
        self.shutdown.cancel();
        for state in self.open.lock().values() {
            state.close.cancel();
        }
    }
}

/// A connection's place among the open ones, given up when it is dropped.
#[derive(Debug)]
struct Registration {
    state: Arc<ConnectionState>,
    connections: Arc<Connections>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock();
        if open
            .get(&self.state.id)
            .is_some_and(|state| Arc::ptr_eq(state, &self.state))
        {
            open.remove(&self.state.id);
        }
    }
}

/// The byte stream under a connection.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One connection handed to the HTTP/2 server: its transport, the preface already read
/// from it (given back first), and the deadlines that close it.
#[derive(Debug)]
pub struct Connection {
    transport: Transport,
    /// The preface, and how much of it was given back.
    preface: Option<usize>,
    registration: Registration,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    idle_deadline: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        let calls: Arc<dyn CallCount> = Arc::clone(&self.registration.state) as Arc<dyn CallCount>;
        match &self.transport {
            Transport::Plain(stream) => ConnectionInfo {
                remote: stream.peer_addr().ok(),
                peer_certificates: None,
                calls,
            },
            Transport::Tls(stream) => {
                let (tcp, session) = stream.get_ref();
                ConnectionInfo {
                    remote: tcp.peer_addr().ok(),
                    peer_certificates: session.peer_certificates().map(|chain| {
                        Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect())
                    }),
                    calls,
                }
            }
        }
    }
}

impl Connection {
    /// Whether the connection is to close now: it was told to, or has been idle too long.
    /// Arms the wake-ups that say when to look again.
    fn closing(&mut self, context: &mut Context<'_>) -> bool {
        if self.closed.as_mut().poll(context).is_ready() {
            return true;
        }
        let state = &self.registration.state;
        if !state.is_idle() {
            return false;
        }
        *state.reader.lock() = Some(context.waker().clone());
        let deadline = *state.idle_since.lock() + self.idle_timeout;
        if self.idle_deadline.deadline() != deadline {
            self.idle_deadline.as_mut().reset(deadline);
        }
        if self.idle_deadline.as_mut().poll(context).is_ready() && state.is_idle() {
            tracing::debug!(
                connection = state.id,
                "closing a connection idle for limits.connection_idle_timeout"
            );
            state.close.cancel();
            return true;
        }
        false
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing(context) {
            // The end of the stream: hyper ends the connection.
            return Poll::Ready(Ok(()));
        }
        if let Some(given) = this.preface {
            let rest = &HTTP2_PREFACE[given..];
            let count = rest.len().min(buffer.remaining());
            buffer.put_slice(&rest[..count]);
            this.preface = (given + count < HTTP2_PREFACE.len()).then_some(given + count);
            return Poll::Ready(Ok(()));
        }
        match &mut this.transport {
            Transport::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(stream) => Pin::new(stream).poll_write(context, bytes),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, bytes),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(stream) => Pin::new(stream).poll_flush(context),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}

/// The connections accepted on `listener` until the stream is dropped or `stop_accepting`
/// is cancelled, each counted in
/// `connections`: TCP with Nagle's algorithm off (with it, a small response waits for the
/// client's delayed acknowledgement), the TLS handshake when `tls` is set, then the
/// HTTP/2 preface, each within its deadline and on a task of its own, so that a slow or
/// silent client never holds up the others. A connection that fails them is logged and
/// closed; that never ends the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    connections: Arc<Connections>,
    stop_accepting: CancellationToken,
) -> ReceiverStream<io::Result<Connection>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // Stopped at once when told: a server that is ending (as the one answering
                // while the database opens does) must not take a connection it will never
                // serve from the listen queue another server shares.
                biased;
                () = stop_accepting.cancelled() => return,
                // The server stopped taking connections.
                () = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, %remote, "cannot turn Nagle's algorithm off");
            }
            let Some(registration) = connections.open() else {
                continue;
            };
            let Ok(permit) = Arc::clone(&opening).acquire_owned().await else {
                return;
            };
            let tls = tls.clone();
            let limits = connections.limits;
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let close = registration.state.close.clone();
                let opened = tokio::select! {
                    () = close.cancelled() => return,
                    opened = open(stream, tls, limits.preface_timeout) => opened,
                };
                match opened {
                    Ok(transport) => {
                        let closed = Box::pin(registration.state.close.clone().cancelled_owned());
                        let connection = Connection {
                            transport,
                            preface: Some(0),
                            registration,
                            closed,
                            idle_deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                            idle_timeout: limits.idle_timeout,
                        };
                        let _ = sender.send(Ok(connection)).await;
                    }
                    Err(problem) => {
                        tracing::debug!(%remote, problem, "connection closed before HTTP/2")
                    }
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// The TLS handshake (within its own timeout) and the HTTP/2 preface (within
/// `preface_timeout`); what went wrong otherwise.
async fn open(
    stream: TcpStream,
    tls: Option<Arc<Tls>>,
    preface_timeout: Duration,
) -> Result<Transport, &'static str> {
    let mut transport = match tls {
        None => Transport::Plain(stream),
        Some(tls) => {
            match tokio::time::timeout(tls.handshake_timeout(), tls.acceptor().accept(stream)).await
            {
                Ok(Ok(stream)) => Transport::Tls(Box::new(stream)),
                Ok(Err(_)) => return Err("TLS handshake failed"),
                Err(_) => return Err("TLS handshake timed out"),
            }
        }
    };
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    let read = async {
        match &mut transport {
            Transport::Plain(stream) => stream.read_exact(&mut preface).await,
            Transport::Tls(stream) => stream.read_exact(&mut preface).await,
        }
    };
    match tokio::time::timeout(preface_timeout, read).await {
        Ok(Ok(_)) if preface == *HTTP2_PREFACE => Ok(transport),
        Ok(Ok(_)) => Err("not HTTP/2: the preface is wrong"),
        Ok(Err(_)) => Err("closed before the HTTP/2 preface"),
        Err(_) => Err("no HTTP/2 preface within limits.connection_preface_timeout"),
    }
}

/// How [`calls_layer`] starts a call: on the connection the request came on.
pub type TakeCall = fn(&mut http::Request<tonic::body::Body>) -> Option<Call>;

/// Counts each call on its connection, from its request until its response has been sent
/// (or dropped), so that idle connections can be told from busy ones.
pub fn calls_layer() -> crate::body::HoldLayer<TakeCall> {
    crate::body::HoldLayer::new(|request| {
        request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| Call::start(Arc::clone(&info.calls)))
    })
}

/// A call in progress on a connection; ended when dropped.
#[derive(Debug)]
pub struct Call(Arc<dyn CallCount>);

impl Call {
    fn start(calls: Arc<dyn CallCount>) -> Call {
        calls.call_started();
        Call(calls)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections_max: usize) -> ConnectionLimits {
        ConnectionLimits {
            connections_max,
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_connection_limit_is_kept_within_the_descriptor_limit() {
        let fitted = limits(usize::MAX)
            .within_descriptors(64)
            .expect("this machine has descriptors to spare");
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("the limit");
        assert_eq!(soft, hard, "the soft limit was raised to the hard limit");
        assert_eq!(
            fitted.connections_max as u64,
            soft - DESCRIPTORS_RESERVED - 64,
            "what is left once the database's files and the reserve are set aside"
        );
        let small = limits(100).within_descriptors(64).expect("fits");
        assert_eq!(small.connections_max, 100, "a limit that fits is kept");
        let error = limits(100)
            .within_descriptors(i32::MAX)
            .expect_err("no descriptors left for connections");
        assert!(
            error
                .to_string()
                .contains("raise it (ulimit -n) or lower storage.max_open_files"),
            "{error}"
        );
    }

    #[test]
    fn at_the_limit_the_longest_idle_connection_makes_room_and_busy_ones_stay() {
        let connections = Connections::new(limits(3));
        let first = connections.open().expect("room");
        let second = connections.open().expect("room");
        let third = connections.open().expect("room");
        // Idle since: the first and the second longest, the third just now.
        for (registration, idle) in [(&first, 3), (&second, 2)] {
            *registration.state.idle_since.lock() -= Duration::from_secs(idle);
        }
        // The first is busy: the second, idle for longest, makes room.
        let call = Call::start(Arc::clone(&first.state) as Arc<dyn CallCount>);
        let fourth = connections.open().expect("room made");
        assert!(
            second.state.close.is_cancelled(),
            "the longest idle was closed"
        );
        assert!(!first.state.close.is_cancelled() && !third.state.close.is_cancelled());
        assert_eq!(connections.count(), 3);
        // Every one busy: a new connection is refused.
        let calls = [&third, &fourth]
            .map(|registration| Call::start(Arc::clone(&registration.state) as Arc<dyn CallCount>));
        assert!(connections.open().is_none(), "none idle, no room");
        // Shutdown closes the idle at once, the busy as their last call ends.
        drop(calls);
        connections.begin_shutdown();
        assert!(third.state.close.is_cancelled() && fourth.state.close.is_cancelled());
        assert!(
            !first.state.close.is_cancelled(),
            "its call is still running"
        );
        drop(call);
        assert!(first.state.close.is_cancelled(), "closed as its call ended");
    }
}
