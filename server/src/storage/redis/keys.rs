//! Key names on a Redis Cluster. A user's keys are tagged with the user's audit partition
//! (`{<prefix><P>}`, `P` = [`partition_of`]), not with the user, so that the partition's audit
//! chain sits in the same hash slot as the users whose records it holds: a user's rows, its
//! index of surfaces, its state, its idempotency records, its pseudonym key, and the chain's
//! records, tail and per-user index can all be read and written by one script. With at most
//! 16,384 partitions (as many as the cluster has slots) the partitions spread over the
//! slots, and so over the masters.

use crate::audit::{PSEUDONYM_LEN, Pseudonym, partition_of};
use crate::registry::SurfaceId;

/// Where a store's keys live: their prefix (so that several stores can share a cluster)
/// and the number of partitions users are spread over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
    partitions: u32,
}

impl Layout {
    pub fn new(prefix: &str, partitions: u32) -> Layout {
        Layout {
            prefix: prefix.to_string(),
            partitions,
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The hash tag of one partition: the part of a key the cluster hashes to find its
    /// slot.
    pub fn tag(&self, partition: u32) -> String {
        format!("{{{}{partition}}}", self.prefix)
    }

    /// The keys of `user_id`, all in the slot of the user's partition.
    pub fn user(&self, user_id: u64) -> UserKeys {
        let partition = partition_of(user_id, self.partitions);
        UserKeys {
            user_id,
            partition,
            tag: self.tag(partition),
        }
    }

    /// The keys of the chain of `partition`.
    pub fn chain(&self, partition: u32) -> ChainKeys {
        ChainKeys {
            partition,
            tag: self.tag(partition),
        }
    }

    /// The store's metadata (a hash), in the slot of chain 0, so that a metadata value and
    /// the audit records about it are written by one script.
    pub fn meta(&self) -> String {
        format!("{}:m", self.tag(0))
    }

    /// A blob (a bulk load's staged chunk), under a tag of its own, so that a job's
    /// chunks spread over the cluster.
    pub fn blob(&self, name: &str) -> String {
        format!("{{{}b:{name}}}", self.prefix)
    }

    /// The metadata a store keeps before it knows its number of partitions, under a tag of
    /// its own: the number of partitions.
    pub fn settings(prefix: &str) -> String {
        format!("{{{prefix}}}:settings")
    }
}

/// The keys of one user, all in the slot of the user's partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserKeys {
    pub user_id: u64,
    pub partition: u32,
    tag: String,
}

impl UserKeys {
    /// One stored row: (user, surface) → the encoded row.
    pub fn row(&self, surface: SurfaceId) -> String {
        format!("{}:r:{}:{}", self.tag, self.user_id, surface.0)
    }

    /// The surfaces the user has rows on (their ids, two bytes each, ascending), so that a
    /// user's rows are found without scanning the keyspace.
    pub fn surfaces(&self) -> String {
        format!("{}:rs:{}", self.tag, self.user_id)
    }

    /// The user's state.
    pub fn state(&self) -> String {
        format!("{}:s:{}", self.tag, self.user_id)
    }

    /// The user's version: moves with every change of anything of the user's, so that a
    /// script can tell whether what the server read is still what is stored.
    pub fn version(&self) -> String {
        format!("{}:v:{}", self.tag, self.user_id)
    }

    /// The user's record of the write with idempotency key `key`.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:i:{}:{key}", self.tag, self.user_id)
    }

    /// The secret key of the user's audit pseudonym.
    pub fn pseudonym_key(&self) -> String {
        format!("{}:k:{}", self.tag, self.user_id)
    }

    /// The user's member in the partition's set of users with rows: the id in 16 hex
    /// digits, so that the set's lexical order is the ids' order.
    pub fn member(&self) -> String {
        user_member(self.user_id)
    }

    /// The chain of the user's partition.
    pub fn chain(&self) -> ChainKeys {
        ChainKeys {
            partition: self.partition,
            tag: self.tag.clone(),
        }
    }
}

/// A user's member in a partition's set of users with rows.
pub fn user_member(user_id: u64) -> String {
    format!("{user_id:016x}")
}

/// The keys of one audit chain, in the slot of its partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainKeys {
    pub partition: u32,
    tag: String,
}

impl ChainKeys {
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

    /// The users of the partition that have rows (a sorted set, every score 0, members
    /// from [`user_member`]), so that purges and sweeps walk users in order.
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
        let layout = Layout::new("fs", 64);
        for user_id in [1, 7, 42, u64::MAX] {
            let keys = layout.user(user_id);
            let chain = keys.chain();
            let all = [
                keys.row(SurfaceId(3)),
                keys.surfaces(),
                keys.state(),
                keys.version(),
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
        let keys = Layout::new("fs", 64).user(42);
        assert_eq!(
            hash_tag(&keys.idempotency("{other}")),
            format!("fs{}", keys.partition),
            "only the first {{...}} of a key counts"
        );
    }
}
