//! The Redis Cluster engine's layout: every key of one user, and the audit chain of the
//! user's partition, carry the same hash tag, so that they live in one hash slot and one
//! server-side script can change them together ([`keys`]).

pub mod keys;
