//! The one place the server reads the system's clocks. Every TTL, expiry and idempotency
//! window is computed from an injected [`Clock`], so tests move time instead of sleeping;
//! durations that are never stored (deadlines, latencies, idle times) come from
//! [`monotonic_now`] and [`tokio_now`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use featurestore::domain::Timestamp;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // A clock before 1970 is a broken host; reporting the epoch keeps every value
        // expiring rather than living forever.
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since_epoch| {
                i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
            });
        Timestamp::from_unix_micros(micros)
    }
}

/// The monotonic clock, for durations that are never stored nor compared with a stored
/// time: request deadlines and latencies.
pub fn monotonic_now() -> std::time::Instant {
    std::time::Instant::now()
}

/// Tokio's monotonic clock, for its timers (intervals, idle timeouts): it stands still
/// in a test that pauses tokio's time.
pub fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// A clock that only moves when told to, for tests.
#[derive(Debug)]
pub struct ManualClock {
    /// The current time in microseconds since the epoch.
    now_micros: AtomicI64,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now_micros: AtomicI64::new(start.unix_micros()),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.now_micros.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_micros(self.now_micros.load(Ordering::SeqCst))
    }
}
