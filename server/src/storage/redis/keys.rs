//! Key names on a Redis Cluster. A user's keys are tagged with the user's audit partition
//! (`{fs<P>}`, `P` = [`partition_of`]), not with the user, so that the partition's audit
//! chain sits in the same hash slot as the users whose records it holds: a user's rows, its
//! index of surfaces, its state, its idempotency records, its pseudonym key, and the chain's
//! records, tail and per-user index can all be read and written by one script. With at most
//! 16,384 partitions (as many as the cluster has slots) the partitions spread over the
//! slots, and so over the masters.

use crate::audit::{PSEUDONYM_LEN, Pseudonym, partition_of};
use crate::registry::SurfaceId;

/// Prefix of every key the store writes.
const PREFIX: &str = "fs";

/// The hash tag of one partition: the part of a key the cluster hashes to find its slot.
pub fn tag(partition: u32) -> String {
    format!("{{{PREFIX}{partition}}}")
}

/// The keys of one user, all in the slot of the user's partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserKeys {
    pub user_id: u64,
    pub partition: u32,
    tag: String,
}

impl UserKeys {
    /// The keys of `user_id` in a store of `partitions` audit partitions.
    pub fn new(user_id: u64, partitions: u32) -> UserKeys {
        let partition = partition_of(user_id, partitions);
        UserKeys {
            user_id,
            partition,
            tag: tag(partition),
        }
    }

    /// One stored row: (user, surface) → the encoded row.
    pub fn row(&self, surface: SurfaceId) -> String {
        format!("{}:r:{}:{}", self.tag, self.user_id, surface.0)
    }

    /// The surfaces the user has rows on (a set), so that a user's rows are found without
    /// scanning the keyspace.
    pub fn surfaces(&self) -> String {
        format!("{}:rs:{}", self.tag, self.user_id)
    }

    /// The user's state.
    pub fn state(&self) -> String {
        format!("{}:s:{}", self.tag, self.user_id)
    }

    /// The user's record of the write with idempotency key `key`.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:i:{}:{key}", self.tag, self.user_id)
    }

    /// The secret key of the user's audit pseudonym.
    pub fn pseudonym_key(&self) -> String {
        format!("{}:k:{}", self.tag, self.user_id)
    }

    /// The chain of the user's partition.
    pub fn chain(&self) -> ChainKeys {
        ChainKeys::new(self.partition)
    }
}

/// The keys of one audit chain, in the slot of its partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainKeys {
    pub partition: u32,
    tag: String,
}

impl ChainKeys {
    pub fn new(partition: u32) -> ChainKeys {
        ChainKeys {
            partition,
            tag: tag(partition),
        }
    }

    /// The chain's records: sequence → encoded record (a hash).
    pub fn records(&self) -> String {
        format!("{}:a", self.tag)
    }

    /// The chain's tail: its next sequence and the hash of its last record.
    pub fn tail(&self) -> String {
        format!("{}:at", self.tag)
    }

    /// The sequences of the records naming `user` (a list).
    pub fn by_user(&self, user: &Pseudonym) -> String {
        let mut hex = String::with_capacity(2 * PSEUDONYM_LEN);
        for byte in user {
            hex.push_str(&format!("{byte:02x}"));
        }
        format!("{}:au:{hex}", self.tag)
    }

    /// The users of the partition that have rows (a sorted set scored by user id), so that
    /// purges and sweeps walk users in order.
    pub fn users(&self) -> String {
        format!("{}:u", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag of a key, as the cluster reads it: the part between the first `{` and
    /// the next `}`, when it is not empty.
    fn hash_tag(key: &str) -> &str {
        let Some(open) = key.find('{') else {
            return key;
        };
        match key[open + 1..].find('}') {
            Some(0) | None => key,
            Some(close) => &key[open + 1..open + 1 + close],
        }
    }

    #[test]
    fn every_key_of_a_user_and_of_its_chain_has_the_partitions_tag() {
        for user_id in [1, 7, 42, u64::MAX] {
            let keys = UserKeys::new(user_id, 64);
            let chain = keys.chain();
            let all = [
                keys.row(SurfaceId(3)),
                keys.surfaces(),
                keys.state(),
                keys.idempotency("load-1#2"),
                keys.pseudonym_key(),
                chain.records(),
                chain.tail(),
                chain.by_user(&[9; PSEUDONYM_LEN]),
                chain.users(),
            ];
            let expected = format!("fs{}", partition_of(user_id, 64));
            for key in &all {
                assert_eq!(hash_tag(key), expected, "{key}");
            }
        }
    }

    #[test]
    fn an_idempotency_key_cannot_move_a_users_record_to_another_slot() {
        let keys = UserKeys::new(42, 64);
        assert_eq!(
            hash_tag(&keys.idempotency("{other}")),
            format!("fs{}", keys.partition),
            "only the first {{...}} of a key counts"
        );
    }
}
