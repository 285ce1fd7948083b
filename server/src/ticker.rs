//! A periodic tick for background work (the retention sweep, the storage probe, reloads of
//! the TLS files), ended by shutdown.

use tokio_util::sync::CancellationToken;

/// Ticks every `interval`, the first after one interval, until shutdown; a tick missed
/// while the work of the last one ran is not made up for.
#[derive(Debug)]
pub struct Ticker {
    ticks: tokio::time::Interval,
    shutdown: CancellationToken,
}

impl Ticker {
    pub fn new(interval: std::time::Duration, shutdown: CancellationToken) -> Ticker {
        let mut ticks = tokio::time::interval_at(crate::clock::tokio_now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { ticks, shutdown }
    }

    /// Waits for the next tick; false once shutdown begins.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            _ = self.ticks.tick() => true,
        }
    }
}
