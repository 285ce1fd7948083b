//! Rows kept in memory in front of RocksDB: a read of a cached row costs a hash lookup
//! instead of a walk through the engine's filters, indexes and blocks.
//!
//! The cache holds the stored bytes, exactly as RocksDB answers them (or that the user has
//! no row on a surface); everything a read decides (expiry, the bundle in force, the
//! registry) is decided on them at read time as on bytes read from the engine, so a cached
//! row is served exactly when the engine's would be.
//!
//! Entries are per user, so that every change of a user (a write, an erasure, a purge,
//! a re-validation) drops all of its rows at once. A row read from the engine is cached
//! only if no change of its user was made since before the read: each stripe of users has
//! a counter that every change moves, under the stripe's lock, after the change is in the
//! engine and before it is acknowledged; a read notes the counter before reading the
//! engine and caches its rows, under the same lock, only if the counter has not moved.
//! So a change is never hidden by a row read before it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::registry::SurfaceId;

/// Stripes of users, each with its change counter and lock.
const STRIPES: usize = 1024;
/// Bytes counted for an entry beyond its rows: the key, the entry, the cache's slot.
const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// One user's cached rows: per surface, the stored bytes or `None` (no row). The bytes are
/// shared, so that adding a surface to an entry copies none of the others.
#[derive(Debug, Default)]
pub(super) struct CachedUser {
    rows: Vec<(SurfaceId, Option<Arc<[u8]>>)>,
}

impl CachedUser {
    /// `Some(bytes)` when the row on `surface` is cached (`bytes` is `None` when the user
    /// has no row there), `None` when it is not.
    pub(super) fn row(&self, surface: SurfaceId) -> Option<Option<&[u8]>> {
        self.rows
            .iter()
            .find(|(cached, _)| *cached == surface)
            .map(|(_, bytes)| bytes.as_deref())
    }

    fn bytes(&self) -> u64 {
        self.rows
            .iter()
            .map(|(_, bytes)| 16 + bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
            .sum::<u64>()
            + ENTRY_OVERHEAD_BYTES
    }
}

#[derive(Clone, Debug)]
struct Weight;

impl quick_cache::Weighter<u64, Arc<CachedUser>> for Weight {
    fn weight(&self, _user: &u64, cached: &Arc<CachedUser>) -> u64 {
        cached.bytes()
    }
}

/// The counter of a user's stripe as a read found it before reading the engine.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket(u64);

/// See the module documentation.
pub(super) struct RowCache {
    users: quick_cache::sync::Cache<u64, Arc<CachedUser>, Weight>,
    stripes: Box<[Stripe]>,
    /// Rows found in the cache and not, since it was made.
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Stripe {
    changes: AtomicU64,
    lock: Mutex<()>,
}

impl std::fmt::Debug for RowCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowCache")
            .field("bytes", &self.users.weight())
            .field("capacity", &self.users.capacity())
            .finish_non_exhaustive()
    }
}

impl RowCache {
    /// A cache of at most about `capacity_bytes` of rows; `None` for 0 (no cache).
    pub(super) fn new(capacity_bytes: u64) -> Option<RowCache> {
        (capacity_bytes > 0).then(|| RowCache {
            // Entries of three rows of a few hundred bytes.
            users: quick_cache::sync::Cache::with_weighter(
                (capacity_bytes / 1024).max(16) as usize,
                capacity_bytes,
                Weight,
            ),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Counts the rows a read found in the cache and those it did not.
    pub(super) fn count(&self, hits: u64, misses: u64) {
        self.hits.fetch_add(hits, Ordering::Relaxed);
        self.misses.fetch_add(misses, Ordering::Relaxed);
    }

    pub(super) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub(super) fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub(super) fn usage_bytes(&self) -> u64 {
        self.users.weight()
    }

    pub(super) fn capacity_bytes(&self) -> u64 {
        self.users.capacity()
    }

    fn stripe(&self, user_id: u64) -> &Stripe {
        // Users are numbered densely: their low bits spread them over the stripes.
        &self.stripes[(user_id as usize) % STRIPES]
    }

    /// The user's cached rows, if any.
    pub(super) fn user(&self, user_id: u64) -> Option<Arc<CachedUser>> {
        self.users.get(&user_id)
    }

    /// To be taken before reading the user's rows from the engine, for [`RowCache::keep`].
    pub(super) fn ticket(&self, user_id: u64) -> Ticket {
        Ticket(self.stripe(user_id).changes.load(Ordering::Acquire))
    }

    /// Caches `rows` of `user_id`, read from the engine after `ticket` was taken, unless
    /// a change of a user of its stripe was made since.
    pub(super) fn keep(
        &self,
        user_id: u64,
        ticket: Ticket,
        rows: impl IntoIterator<Item = (SurfaceId, Option<Arc<[u8]>>)>,
    ) {
        let stripe = self.stripe(user_id);
        let _locked = stripe.lock.lock();
        if stripe.changes.load(Ordering::Acquire) != ticket.0 {
            return;
        }
        // Rows cached since the ticket are as current as these: no change came between.
        let mut kept = match self.users.peek(&user_id) {
            Some(cached) => CachedUser {
                rows: cached.rows.clone(),
            },
            None => CachedUser::default(),
        };
        for (surface, bytes) in rows {
            if kept.row(surface).is_none() {
                kept.rows.push((surface, bytes));
            }
        }
        self.users.insert(user_id, Arc::new(kept));
    }

    /// Drops the rows of `user_id`, whose change is in the engine: called before the change
    /// is acknowledged.
    pub(super) fn changed(&self, user_id: u64) {
        let stripe = self.stripe(user_id);
        let _locked = stripe.lock.lock();
        stripe.changes.fetch_add(1, Ordering::AcqRel);
        self.users.remove(&user_id);
    }

    /// Drops every row: after a change whose users are not known one by one (table files
    /// ingested, a compaction that drops expired rows).
    pub(super) fn clear(&self) {
        let locked: Vec<_> = self
            .stripes
            .iter()
            .map(|stripe| {
                let locked = stripe.lock.lock();
                stripe.changes.fetch_add(1, Ordering::AcqRel);
                locked
            })
            .collect();
        self.users.clear();
        drop(locked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(byte: u8) -> Option<Arc<[u8]>> {
        Some(Arc::from(vec![byte; 4]))
    }

    #[test]
    fn rows_read_before_a_change_of_their_user_are_not_kept() {
        let cache = RowCache::new(1 << 20).expect("a cache");
        let ticket = cache.ticket(7);
        cache.changed(7);
        cache.keep(7, ticket, [(SurfaceId(1), row(1))]);
        assert!(
            cache.user(7).is_none(),
            "a row older than the change is dropped"
        );

        let ticket = cache.ticket(7);
        cache.keep(7, ticket, [(SurfaceId(1), row(2))]);
        let cached = cache.user(7).expect("kept");
        assert_eq!(cached.row(SurfaceId(1)), Some(Some(&[2u8; 4][..])));
        assert_eq!(cached.row(SurfaceId(2)), None, "not cached");
    }

    #[test]
    fn a_change_drops_every_row_of_its_user_and_only_those() {
        let cache = RowCache::new(1 << 20).expect("a cache");
        let ticket = cache.ticket(7);
        cache.keep(7, ticket, [(SurfaceId(1), row(1))]);
        let ticket = cache.ticket(7);
        cache.keep(7, ticket, [(SurfaceId(2), None)]);
        let ticket = cache.ticket(8);
        cache.keep(8, ticket, [(SurfaceId(1), row(3))]);
        let cached = cache.user(7).expect("kept");
        assert_eq!(cached.row(SurfaceId(2)), Some(None), "known to have no row");
        assert!(cached.row(SurfaceId(1)).is_some(), "rows add up");

        cache.changed(7);
        assert!(cache.user(7).is_none());
        assert!(cache.user(8).is_some());
        cache.clear();
        assert!(cache.user(8).is_none());
    }

    #[test]
    fn the_cache_keeps_to_its_size() {
        let cache = RowCache::new(64 << 10).expect("a cache");
        for user in 0..10_000 {
            let ticket = cache.ticket(user);
            cache.keep(user, ticket, [(SurfaceId(1), Some(vec![0; 400].into()))]);
        }
        assert!(cache.users.weight() <= 64 << 10);
        assert!(RowCache::new(0).is_none());
    }
}
