//! The cluster's topology changes under reads and writes. A master dies (SIGKILL): the rows
//! of the other masters never fail, the dead master's rows serve again once its replica
//! took over, no acknowledged write or erasure is lost, and no erased user is readable.
//! Every slot of a master moves to another: nothing fails, nothing is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use featurestore::domain::{Timestamp, Value};
use featurestore::proto::{ErasureState, RowStatus, ValueStatus};
use featurestore_server::config::Backend;
use featurestore_server::storage::redis::keys::Layout;
use featurestore_tests::cluster::{self, NODE_TIMEOUT_MILLIS, RedisCluster};
use featurestore_tests::{TestServer, at, poll_every, read, row, write};
use std::sync::Mutex;

use crate::{float, status};

const USERS: u64 = 120;
const PARTITIONS: u32 = 16;
const FEATURE: &str = "interest_hiking";
const SURFACE: &str = "facebook_feed";

/// What the load saw: per user, the latest acknowledged value; failures by shard.
#[derive(Debug, Default)]
struct Seen {
    acknowledged: HashMap<u64, f32>,
    writes_acknowledged: u64,
    writes_failed: u64,
    /// Rows answered UNAVAILABLE, by the master that served them before the kill.
    unavailable_rows: HashMap<u16, u64>,
    /// Whole read batches that failed.
    failed_batches: u64,
    /// Reads whose rows were all served after the kill.
    reads_ok_after_kill: u64,
    /// When the dead master's rows were last unavailable.
    last_unavailable: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_loses_nothing_and_fails_only_its_rows() {
    let mut cluster = RedisCluster::start().await;
    // Which master holds each user, before the kill. A command to the dead master gives up
    // after a second.
    let (server, layout, master_of) = users_on(&cluster, Duration::from_secs(1)).await;
    let victim = master_of[&1];
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut sequence = 0u32;
    // Every user gets a value; one user of the victim is erased before the kill.
    for user in 1..=USERS {
        sequence += 1;
        write_value(&server, &seen, user, sequence).await;
    }
    let erased = (2..=USERS)
        .find(|user| master_of[user] == victim)
        .expect("the victim holds more than one user");
    assert!(
        server
            .client
            .erase_user(erased)
            .await
            .expect("erase")
            .verified
    );

    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let reader = tokio::spawn(read_load(
        Arc::clone(&server),
        Arc::clone(&seen),
        master_of.clone(),
        victim,
        Arc::clone(&killed_at),
        Arc::clone(&stop),
    ));
    let writer = {
        let (server, seen, stop) = (Arc::clone(&server), Arc::clone(&seen), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut sequence = 1_000;
            while !stop.load(Ordering::SeqCst) {
                for user in 1..=USERS {
                    if user == erased || stop.load(Ordering::SeqCst) {
                        continue;
                    }
                    sequence += 1;
                    write_value(&server, &seen, user, sequence).await;
                }
            }
        })
    };

    featurestore_tests::pause(Duration::from_millis(500)).await;
    *killed_at.lock().expect("not poisoned") = Some(Instant::now());
    cluster.kill(victim);
    let killed = Instant::now();
    // The dead master's rows serve again once its replica has taken over.
    let mut ticks = poll_every(Duration::from_millis(50));
    let recovered = loop {
        let response = server
            .client
            .get_features(read(&[(1, SURFACE)], &[FEATURE]))
            .await;
        if response.is_ok_and(|response| response.rows[0].status == RowStatus::Ok as i32) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_millis(NODE_TIMEOUT_MILLIS) + Duration::from_secs(15),
            "the dead master's rows did not serve again"
        );
        ticks.tick().await;
    };
    // The old master comes back as the replica of the new one: writes are confirmed again.
    let new_master = cluster
        .master_of(&layout.user(1).state())
        .expect("a master");
    cluster.restart(victim);
    let mut ticks = poll_every(Duration::from_millis(50));
    while !cluster.has_replica(new_master) {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no replica came back"
        );
        ticks.tick().await;
    }
    featurestore_tests::pause(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    reader.await.expect("the reader ends");
    writer.await.expect("the writer ends");

    // Every actor has ended: what they saw is final.
    let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    eprintln!(
        "failover: rows of the dead master serve again after {:.2} s; writes acknowledged {}, \
         failed {}; rows unavailable by master {:?}; failed read batches {}; reads served whole \
         after the kill {}",
        recovered.as_secs_f64(),
        seen.writes_acknowledged,
        seen.writes_failed,
        seen.unavailable_rows,
        seen.failed_batches,
        seen.reads_ok_after_kill,
    );
    assert_eq!(seen.failed_batches, 0, "a read batch failed whole");
    let others: u64 = seen
        .unavailable_rows
        .iter()
        .filter(|(port, _)| **port != victim)
        .map(|(_, rows)| rows)
        .sum();
    assert_eq!(others, 0, "rows of the masters that stayed up failed");
    assert!(seen.reads_ok_after_kill > 0);

    // Nothing acknowledged is lost: each user serves its last acknowledged value or a later
    // one (values grow with their event times).
    let keys: Vec<(u64, &str)> = (1..=USERS).map(|user| (user, SURFACE)).collect();
    let response = server
        .client
        .get_features(read(&keys, &[FEATURE]))
        .await
        .expect("read after the failover");
    let mut lost = Vec::new();
    for (index, user) in (1..=USERS).enumerate() {
        if user == erased {
            assert_ne!(status(&response, index, FEATURE), ValueStatus::Present);
            continue;
        }
        let acknowledged = seen.acknowledged[&user];
        if status(&response, index, FEATURE) != ValueStatus::Present
            || float(&response, index, FEATURE) < acknowledged
        {
            lost.push(user);
        }
    }
    assert_eq!(lost, Vec::<u64>::new(), "acknowledged writes lost");
    let state = server.client.get_user_state(erased).await.expect("state");
    assert_eq!(
        state.erasure_state,
        ErasureState::Erased as i32,
        "the erasure survived the failover"
    );
}

/// A server on `cluster` under a fresh key prefix, waiting `response_timeout` for a node's
/// answer, its `USERS` users' states set; the store's layout, and the master holding each
/// user now.
async fn users_on(
    cluster: &RedisCluster,
    response_timeout: Duration,
) -> (Arc<TestServer>, Layout, HashMap<u64, u16>) {
    let prefix = cluster::unique_prefix();
    let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.storage.backend = Backend::RedisCluster;
        config.storage.redis_cluster = crate::redis_cluster::store_config(cluster);
        config.storage.redis_cluster.key_prefix = prefix.clone();
        config.storage.redis_cluster.response_timeout = response_timeout;
        config.storage.audit_partitions = PARTITIONS;
    })
    .await;
    server.us_adults(1..=USERS).await;
    let layout = Layout::new(&prefix, PARTITIONS);
    let master_of = (1..=USERS)
        .map(|user| {
            let port = cluster
                .master_of(&layout.user(user).state())
                .expect("a master serves every slot");
            (user, port)
        })
        .collect();
    (Arc::new(server), layout, master_of)
}

/// Writes value `sequence` for `user`, with an event time that grows with it, and records
/// what was acknowledged.
async fn write_value(server: &TestServer, seen: &Mutex<Seen>, user: u64, sequence: u32) {
    let event_time = Timestamp::from_unix_micros(at(-3_600).unix_micros() + i64::from(sequence));
    let value = sequence as f32;
    let result = server
        .client
        .write_features(write(
            &format!("failover-{user}-{sequence}"),
            vec![row(
                user,
                &[SURFACE],
                event_time,
                vec![(FEATURE, Value::Float(value))],
            )],
        ))
        .await;
    let mut seen = seen.lock().expect("not poisoned");
    match result {
        Ok(_) => {
            seen.writes_acknowledged += 1;
            seen.acknowledged.insert(user, value);
        }
        Err(_) => seen.writes_failed += 1,
    }
}

/// Reads every user's row in one batch, again and again, counting what failed where.
async fn read_load(
    server: Arc<TestServer>,
    seen: Arc<Mutex<Seen>>,
    master_of: HashMap<u64, u16>,
    victim: u16,
    killed_at: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
) {
    let keys: Vec<(u64, &str)> = (1..=USERS).map(|user| (user, SURFACE)).collect();
    while !stop.load(Ordering::SeqCst) {
        let response = server.client.get_features(read(&keys, &[FEATURE])).await;
        let after_kill = killed_at.lock().expect("not poisoned").is_some();
        let mut seen = seen.lock().expect("not poisoned");
        let Ok(response) = response else {
            seen.failed_batches += 1;
            continue;
        };
        let mut whole = true;
        for (index, row) in response.rows.iter().enumerate() {
            if row.status == RowStatus::Unavailable as i32 {
                whole = false;
                let master = master_of[&(index as u64 + 1)];
                *seen.unavailable_rows.entry(master).or_default() += 1;
                if master == victim {
                    seen.last_unavailable = Some(Instant::now());
                }
            }
        }
        if whole && after_kill {
            seen.reads_ok_after_kill += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_moving_to_another_master_under_load_fail_nothing() {
    let cluster = Arc::new(RedisCluster::start().await);
    // A master moving slots out blocks while it migrates their keys: the default timeout.
    let (server, layout, master_of) = users_on(&cluster, Duration::from_secs(2)).await;
    let source = master_of[&1];
    let target = *cluster
        .master_ports()
        .iter()
        .find(|&&port| port != source)
        .expect("another master");
    let seen = Arc::new(Mutex::new(Seen::default()));
    for user in 1..=USERS {
        write_value(&server, &seen, user, user as u32).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_load(
        Arc::clone(&server),
        Arc::clone(&seen),
        master_of.clone(),
        source,
        Arc::new(Mutex::new(Some(Instant::now()))),
        Arc::clone(&stop),
    ));
    let writer = {
        let (server, seen, stop) = (Arc::clone(&server), Arc::clone(&seen), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut sequence = 1_000;
            while !stop.load(Ordering::SeqCst) {
                for user in 1..=USERS {
                    sequence += 1;
                    write_value(&server, &seen, user, sequence).await;
                }
            }
        })
    };
    // Every slot of the source master moves, its keys with it, while the load runs.
    let moving = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || moving.reshard(source, target, 5_461))
        .await
        .expect("the resharding ends");
    assert_eq!(
        cluster.master_of(&layout.user(1).state()),
        Some(target),
        "user 1's slot moved"
    );
    featurestore_tests::pause(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    reader.await.expect("the reader ends");
    writer.await.expect("the writer ends");

    let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    eprintln!(
        "resharding: writes acknowledged {}, failed {}; rows unavailable {:?}; failed read \
         batches {}; reads served whole {}",
        seen.writes_acknowledged,
        seen.writes_failed,
        seen.unavailable_rows,
        seen.failed_batches,
        seen.reads_ok_after_kill,
    );
    assert_eq!(seen.failed_batches, 0, "a read batch failed whole");
    assert_eq!(
        seen.unavailable_rows,
        HashMap::new(),
        "rows failed while slots moved"
    );
    assert_eq!(seen.writes_failed, 0, "writes failed while slots moved");
    let keys: Vec<(u64, &str)> = (1..=USERS).map(|user| (user, SURFACE)).collect();
    let response = server
        .client
        .get_features(read(&keys, &[FEATURE]))
        .await
        .expect("read after the resharding");
    for (index, user) in (1..=USERS).enumerate() {
        assert!(
            float(&response, index, FEATURE) >= seen.acknowledged[&user],
            "user {user} lost an acknowledged write"
        );
    }
}
