//! The Redis Cluster the tests start: six real `redis-server` nodes on loopback, three
//! masters with a replica each, reached through the cluster client (redirections followed).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use featurestore_server::config::RedisClusterConfig;
use featurestore_server::registry::SurfaceId;
use featurestore_server::storage::RedisStore;
use featurestore_server::storage::conformance::{Opened, PROMISES};
use featurestore_server::storage::redis::keys::Layout;
use featurestore_tests::cluster::{self, RedisCluster};
use redis::AsyncCommands;

/// Settings of a store of its own on `cluster`: a fresh key prefix, replicas confirming
/// every change.
pub fn store_config(cluster: &RedisCluster) -> RedisClusterConfig {
    RedisClusterConfig {
        seeds: cluster.seeds(),
        key_prefix: cluster::unique_prefix(),
        ..RedisClusterConfig::default()
    }
}

#[test]
fn the_redis_store_keeps_every_promise_of_the_store() {
    let cluster = cluster::shared();
    let open = || Opened {
        store: Arc::new(RedisStore::open(&store_config(cluster), 8).expect("open the store")),
        keep: Box::new(()),
    };
    let mut broken = Vec::new();
    for (name, promise) in PROMISES {
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| promise(&open))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            broken.push(format!("{name}: {message}"));
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {} promises broken:\n{}",
        broken.len(),
        PROMISES.len(),
        broken.join("\n")
    );
}

#[tokio::test]
async fn the_test_cluster_serves_keys_of_every_master() {
    let cluster = cluster::shared();
    assert_eq!(cluster.master_ports().len(), 3, "three masters");
    let client = redis::cluster::ClusterClient::new(cluster.seeds()).expect("cluster client");
    let mut connection = client
        .get_async_connection()
        .await
        .expect("connect to the cluster");
    // Hash tags spread over the slots: every master holds some of them.
    for tag in 0..64u32 {
        let key = format!("{{{tag}}}:probe");
        let () = connection.set(&key, tag).await.expect("set");
    }
    for tag in 0..64u32 {
        let key = format!("{{{tag}}}:probe");
        let read: u32 = connection.get(&key).await.expect("get");
        assert_eq!(read, tag);
    }
    let masters_holding_keys = cluster
        .master_ports()
        .into_iter()
        .filter(|&port| {
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "dbsize"])
                .output()
                .ok()
                .and_then(|output| {
                    String::from_utf8_lossy(&output.stdout)
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|keys| keys > 0)
        })
        .count();
    assert_eq!(masters_holding_keys, 3, "keys landed on every master");

    // The store's layout: every key of a user, and its partition's audit chain, in one slot
    // (what the cluster itself computes), so that one script can change them together.
    for user_id in [1u64, 42, 1_000_003] {
        let keys = Layout::new("fs", 64).user(user_id);
        let chain = keys.chain();
        let mut slots = Vec::new();
        for key in [
            keys.row(SurfaceId(1)),
            keys.surfaces(),
            keys.state(),
            keys.version(),
            keys.idempotency("job-7#3"),
            keys.pseudonym_key(),
            chain.records(),
            chain.tail(),
            chain.by_user(&[5; 16]),
            chain.users(),
        ] {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .expect("CLUSTER KEYSLOT");
            slots.push(slot);
        }
        slots.dedup();
        assert_eq!(slots.len(), 1, "user {user_id}: {slots:?}");
    }
}
