//! A bounded stress test of the store's central promise with everything racing: writers,
//! the privacy system changing states and erasing users, bulk loads committing, and the
//! policy bundle swapped back and forth, all through the real client. A checker reads every
//! cell again and again and judges each value served with an oracle of the rules written
//! here, independently of the server's policy code; no value the rules forbid may ever be
//! served, and every erasure must end verified with nothing of the user left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use featurestore::domain::FeatureWrite;
use featurestore::domain::{AgeBand, Provenance, UserStateUpdate, Value, WriteRow};
use featurestore::proto::{self, ErasureState, ValueStatus};
use featurestore_client::Client;
use featurestore_server::policy::DEFAULT_BUNDLE_TOML;
use featurestore_tests::workload::Random;
use featurestore_tests::{TestServer, at, read, write};
use tonic::Code;

/// How long the actors run.
const RUN: Duration = Duration::from_secs(12);
const USERS: u64 = 40;
const WRITERS: usize = 3;
const SURFACES: [(&str, &str, bool); 4] = [
    ("facebook_feed", "facebook", false),
    ("facebook_ads", "facebook", true),
    ("instagram_reels", "instagram", false),
    ("instagram_ads", "instagram", true),
];
const FEATURES: [&str; 3] = [
    "interest_hiking",
    "interest_cooking",
    "interest_fitness_health",
];
/// Half of them exclude AI-derived signals (under the tighter bundle, Brazil too).
const JURISDICTIONS: [&str; 8] = ["US", "US", "US-CA", "BR", "DE", "GB", "KR", ""];
/// The second bundle: Brazil joins South Korea's group, so AI signals are excluded there.
fn tighter_bundle() -> String {
    DEFAULT_BUNDLE_TOML.replace("kr = [\"KR\"]", "kr = [\"KR\", \"BR\"]")
}

/// What the producers know of each user: the generation the privacy system last
/// answered with (they may act on one that is already stale, as real pipelines do).
#[derive(Default)]
struct Known {
    generations: HashMap<u64, u64>,
    erased: std::collections::HashSet<u64>,
}

/// A value's provenance, carried in the value itself so that the checker can judge it:
/// 0.5 and up is AI-derived, and within each half, 0.25 and up came from Instagram.
fn encode(ai: bool, from_instagram: bool, random: &mut Random) -> f32 {
    f32::from(u8::from(ai)) * 0.5
        + f32::from(u8::from(from_instagram)) * 0.25
        + 0.01
        + random.below(20) as f32 / 100.0
}

fn decode(value: f32) -> (bool, bool) {
    (value >= 0.5, value % 0.5 >= 0.25)
}

/// The oracle: whether the rules forbid serving a value with this provenance on `surface`
/// to a user in `state`, under the default bundle or the tighter one.
fn forbidden(
    state: &proto::UserState,
    tighter: bool,
    surface: usize,
    feature: &str,
    value: f32,
) -> Option<&'static str> {
    let (ai, from_instagram) = decode(value);
    let (_, app, ads) = SURFACES[surface];
    let origin = if from_instagram {
        "instagram"
    } else {
        "facebook"
    };
    let excluded = matches!(state.jurisdiction.as_str(), "DE" | "GB" | "KR" | "")
        || (tighter && state.jurisdiction == "BR");
    let linked = |app: &str| state.linked_apps.iter().any(|linked| linked == app);
    if state.erasure_state != ErasureState::None as i32 {
        Some("the user is erased")
    } else if feature == "interest_fitness_health" {
        Some("a special category")
    } else if ai && excluded {
        Some("an AI signal where they are excluded")
    } else if ads && state.age_band != proto::AgeBand::Adult as i32 {
        Some("ads for someone not known to be an adult")
    } else if ads && state.ads_objection {
        Some("ads for someone who objected")
    } else if origin != app && !(linked(origin) && linked(app)) {
        Some("a signal across unlinked apps")
    } else {
        None
    }
}

/// Rows for `users` as a producer derives them: random sources, apps, surfaces and
/// features, each stating the generation the producer knows.
fn rows(users: &[u64], known: &Mutex<Known>, random: &mut Random) -> Vec<WriteRow> {
    let generations = known.lock().expect("not poisoned").generations.clone();
    users
        .iter()
        .map(|&user_id| {
            let ai = random.chance(60);
            let from_instagram = random.chance(30);
            let surfaces: Vec<String> = SURFACES
                .iter()
                .filter(|_| random.chance(60))
                .map(|(name, _, _)| name.to_string())
                .collect();
            let surfaces = if surfaces.is_empty() {
                vec![SURFACES[0].0.to_string()]
            } else {
                surfaces
            };
            let mut features: Vec<FeatureWrite> = Vec::new();
            for feature in FEATURES {
                // The health interest only comes from the assistant.
                if (ai || feature != "interest_fitness_health")
                    && (features.is_empty() || random.chance(70))
                {
                    features.push(FeatureWrite {
                        name: feature.to_string(),
                        value: Value::Float(encode(ai, from_instagram, random)),
                        topic: None,
                        ttl: None,
                    });
                }
            }
            WriteRow {
                user_id,
                target_surfaces: surfaces,
                provenance: Provenance {
                    source: if ai { "ai_chat" } else { "engagement" }.to_string(),
                    origin_app: if from_instagram {
                        "instagram"
                    } else {
                        "facebook"
                    }
                    .to_string(),
                    interaction_time: at(-60 - random.below(3600) as i64),
                    producer_id: "stress@v1".to_string(),
                    microphone_permission_granted: false,
                },
                features,
                user_state_generation: generations.get(&user_id).copied().unwrap_or(0),
            }
        })
        .collect()
}

fn some_users(random: &mut Random, most: u64) -> Vec<u64> {
    let mut users: Vec<u64> = (0..1 + random.below(most))
        .map(|_| 1 + random.below(USERS))
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// Counts of what happened, for the report.
#[derive(Default)]
struct Tally {
    writes_applied: AtomicU64,
    writes_refused: AtomicU64,
    state_changes: AtomicU64,
    erasures: AtomicU64,
    commits: AtomicU64,
    reloads: AtomicU64,
    checks: AtomicU64,
    cells_judged: AtomicU64,
    /// Writes and commits that had a state change or an erasure of one of their users
    /// land while they were in flight.
    races: AtomicU64,
}

/// When each user's state last changed, to count the races.
#[derive(Default)]
struct Changes {
    at: HashMap<u64, Vec<Instant>>,
}

impl Changes {
    fn overlapping(&self, users: &[u64], from: Instant, to: Instant) -> bool {
        users.iter().any(|user| {
            self.at
                .get(user)
                .is_some_and(|times| times.iter().any(|time| (from..=to).contains(time)))
        })
    }
}

struct Shared {
    known: Mutex<Known>,
    changes: Mutex<Changes>,
    tally: Tally,
    stop: AtomicBool,
    /// The hash of the default bundle: any other in force is the tighter one.
    default_bundle_hash: String,
    receipts: Mutex<Vec<String>>,
}

async fn writer(client: Client, shared: Arc<Shared>, seed: u64) {
    let mut random = Random(seed);
    let mut sequence = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        sequence += 1;
        // Pipelines mostly learn of an erasure; now and then one still sends the user.
        let erased = shared.known.lock().expect("not poisoned").erased.clone();
        let users: Vec<u64> = some_users(&mut random, 25)
            .into_iter()
            .filter(|user| !erased.contains(user) || random.chance(10))
            .collect();
        if users.is_empty() {
            continue;
        }
        let request = write(
            &format!("stress-{seed}-{sequence}"),
            rows(&users, &shared.known, &mut random),
        );
        let started = Instant::now();
        let answer = client.write_features(request).await;
        let ended = Instant::now();
        match answer {
            Ok(_) => shared.tally.writes_applied.fetch_add(1, Ordering::SeqCst),
            Err(error) if matches!(error.code(), Code::FailedPrecondition | Code::Aborted) => {
                shared.tally.writes_refused.fetch_add(1, Ordering::SeqCst)
            }
            Err(error) => panic!("write: {error}"),
        };
        if shared
            .changes
            .lock()
            .expect("not poisoned")
            .overlapping(&users, started, ended)
        {
            shared.tally.races.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn privacy(client: Client, shared: Arc<Shared>, seed: u64) {
    let mut random = Random(seed);
    while !shared.stop.load(Ordering::SeqCst) {
        let user_id = 1 + random.below(USERS);
        if random.chance(3) {
            let receipt = client.erase_user(user_id).await.expect("erase");
            shared
                .receipts
                .lock()
                .expect("not poisoned")
                .push(receipt.receipt_id);
            shared.tally.erasures.fetch_add(1, Ordering::SeqCst);
            let state = client.get_user_state(user_id).await.expect("state");
            let mut known = shared.known.lock().expect("not poisoned");
            known.generations.insert(user_id, state.generation);
            known.erased.insert(user_id);
        } else {
            let linked: Vec<String> = ["facebook", "instagram"]
                .iter()
                .filter(|_| random.chance(70))
                .map(|app| app.to_string())
                .collect();
            let update = UserStateUpdate {
                user_id,
                jurisdiction: JURISDICTIONS[random.below(JURISDICTIONS.len() as u64) as usize]
                    .to_string(),
                age_band: [
                    AgeBand::Adult,
                    AgeBand::Adult,
                    AgeBand::Minor,
                    AgeBand::Unknown,
                ][random.below(4) as usize],
                linked_apps: linked,
                ads_objection: random.chance(20),
                expected_generation: None,
            };
            let state = client.set_user_state(update).await.expect("set state");
            shared
                .known
                .lock()
                .expect("not poisoned")
                .generations
                .insert(user_id, state.generation);
            shared.tally.state_changes.fetch_add(1, Ordering::SeqCst);
        }
        shared
            .changes
            .lock()
            .expect("not poisoned")
            .at
            .entry(user_id)
            .or_default()
            .push(Instant::now());
        featurestore_tests::pause(Duration::from_millis(random.below(15))).await;
    }
}

async fn loader(client: Client, shared: Arc<Shared>, seed: u64) {
    let mut random = Random(seed);
    let mut job = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        job += 1;
        let users = some_users(&mut random, 30);
        let started = Instant::now();
        let mut session = client
            .start_load(&format!("stress-{job}"), "")
            .await
            .expect("attach");
        for sequence in 1..=2 {
            let chunk = rows(&users, &shared.known, &mut random)
                .into_iter()
                .map(proto::WriteRow::from)
                .collect();
            session.send_chunk(sequence, chunk).await.expect("send");
            session.next_ack().await.expect("staged");
        }
        // UNAVAILABLE is retryable: a commit that failed before applying anything leaves
        // its job open, and a real loader commits it again.
        let mut committed = session.commit().await;
        for _ in 0..3 {
            match &committed {
                Err(error) if error.code() == Code::Unavailable => {
                    let session = client
                        .start_load(&format!("stress-{job}"), "")
                        .await
                        .expect("attach again");
                    committed = session.commit().await;
                }
                _ => break,
            }
        }
        committed.expect("commit");
        shared.tally.commits.fetch_add(1, Ordering::SeqCst);
        if shared
            .changes
            .lock()
            .expect("not poisoned")
            .overlapping(&users, started, Instant::now())
        {
            shared.tally.races.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn reloader(client: Client, shared: Arc<Shared>, bundle_path: std::path::PathBuf) {
    let mut tighter = false;
    while !shared.stop.load(Ordering::SeqCst) {
        featurestore_tests::pause(Duration::from_millis(700)).await;
        tighter = !tighter;
        let text = if tighter {
            tighter_bundle()
        } else {
            DEFAULT_BUNDLE_TOML.to_string()
        };
        std::fs::write(&bundle_path, text).expect("write the bundle");
        client.reload_policy().await.expect("reload");
        shared.tally.reloads.fetch_add(1, Ordering::SeqCst);
    }
}

/// The state of every user that has one, asked for all at once.
async fn states(client: &Client) -> HashMap<u64, proto::UserState> {
    let mut asking = tokio::task::JoinSet::new();
    for user_id in 1..=USERS {
        let client = client.clone();
        asking.spawn(async move { (user_id, client.get_user_state(user_id).await) });
    }
    let mut states = HashMap::new();
    while let Some(answer) = asking.join_next().await {
        match answer.expect("the state's task") {
            (user_id, Ok(state)) => {
                states.insert(user_id, state);
            }
            (_, Err(error)) if error.code() == Code::NotFound => {}
            (_, Err(error)) => panic!("state: {error}"),
        }
    }
    states
}

/// Reads every cell and judges every value served. Values are judged only for users whose
/// state did not change while the cells were read, under a bundle that stayed in force
/// throughout; returns the forbidden values seen.
async fn check(client: &Client, shared: &Shared) -> Vec<String> {
    let bundle_before = client.policy_status().await.expect("status").hash;
    let tighter = bundle_before != shared.default_bundle_hash;
    let before = states(client).await;
    let keys: Vec<(u64, &str)> = (1..=USERS)
        .flat_map(|user| SURFACES.iter().map(move |(surface, _, _)| (user, *surface)))
        .collect();
    let response = client
        .get_features(read(&keys, &FEATURES))
        .await
        .expect("read");
    let after = states(client).await;
    let bundle_after = client.policy_status().await.expect("status").hash;
    if bundle_before != bundle_after {
        return Vec::new();
    }
    let mut seen = Vec::new();
    for (index, (user_id, surface_name)) in keys.iter().enumerate() {
        let (Some(state), Some(state_after)) = (before.get(user_id), after.get(user_id)) else {
            continue;
        };
        if state.generation != state_after.generation {
            continue;
        }
        let surface = index % SURFACES.len();
        for feature in FEATURES {
            if crate::status(&response, index, feature) != ValueStatus::Present {
                continue;
            }
            shared.tally.cells_judged.fetch_add(1, Ordering::SeqCst);
            let value = crate::float(&response, index, feature);
            if let Some(why) = forbidden(state, tighter, surface, feature, value) {
                seen.push(format!(
                    "user {user_id} {surface_name} {feature} = {value}: {why} (state {state:?})"
                ));
            }
        }
    }
    shared.tally.checks.fetch_add(1, Ordering::SeqCst);
    seen
}

#[test]
fn no_forbidden_value_is_ever_served_while_everything_races() {
    let report = crate::run_in_child("stress::everything_races");
    for line in report.lines().filter(|line| line.starts_with("stress ")) {
        eprintln!("{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by no_forbidden_value_is_ever_served_while_everything_races"]
async fn everything_races() {
    if !crate::is_child_for("stress::everything_races") {
        return;
    }
    // Random pauses between each decision and its application widen the windows in which
    // a state change can land, as a loaded machine would.
    for (failpoint, action) in [
        ("write-decided", "50%sleep(3)"),
        ("load-chunk-decided", "50%sleep(5)"),
        ("load-commit-prepared", "sleep(20)"),
        ("revalidate-decided", "5%sleep(2)"),
    ] {
        fail::cfg(failpoint, action).expect("configure the failpoint");
    }
    let bundle = tempfile::tempdir().expect("directory");
    let bundle_path = bundle.path().join("bundle.toml");
    std::fs::write(&bundle_path, DEFAULT_BUNDLE_TOML).expect("write the bundle");
    let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.policy_bundle_path = Some(bundle_path.clone());
        // Bulk loads take the table-file path.
        config.bulk_load.ingest_rows_min = 1;
    })
    .await;
    race(&[&server], Some(&bundle_path), true, RUN).await;
}

/// Runs the actors against `servers` for `run`, then judges: writers on every server in
/// turn, the privacy system on the last, and (when asked) bulk loads and bundle reloads
/// from `bundle_path` on the first, which also serves the checker's reads.
pub(crate) async fn race(
    servers: &[&TestServer],
    bundle_path: Option<&std::path::Path>,
    loads: bool,
    run: Duration,
) {
    let server = servers[0];
    server.us_adults(1..=USERS).await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |since| since.as_nanos() as u64);
    let shared = Arc::new(Shared {
        known: Mutex::new(Known {
            generations: (1..=USERS).map(|user| (user, 1)).collect(),
            erased: std::collections::HashSet::new(),
        }),
        changes: Mutex::new(Changes::default()),
        tally: Tally::default(),
        stop: AtomicBool::new(false),
        default_bundle_hash: server.client.policy_status().await.expect("status").hash,
        receipts: Mutex::new(Vec::new()),
    });

    let mut actors = Vec::new();
    for writer_index in 0..WRITERS {
        actors.push(tokio::spawn(writer(
            servers[writer_index % servers.len()].client.clone(),
            Arc::clone(&shared),
            seed.wrapping_add(writer_index as u64),
        )));
    }
    actors.push(tokio::spawn(privacy(
        servers[servers.len() - 1].client.clone(),
        Arc::clone(&shared),
        seed.wrapping_add(100),
    )));
    if loads {
        actors.push(tokio::spawn(loader(
            server.client.clone(),
            Arc::clone(&shared),
            seed.wrapping_add(200),
        )));
    }
    if let Some(bundle_path) = bundle_path {
        actors.push(tokio::spawn(reloader(
            server.client.clone(),
            Arc::clone(&shared),
            bundle_path.to_path_buf(),
        )));
    }

    let started = Instant::now();
    let mut forbidden_seen = Vec::new();
    while started.elapsed() < run {
        forbidden_seen.extend(check(&server.client, &shared).await);
    }
    shared.stop.store(true, Ordering::SeqCst);
    for actor in actors {
        actor.await.expect("an actor");
    }
    // Quiescent: the purge of the bundle in force ends, then every cell is judged.
    server.wait_for_purge().await;
    forbidden_seen.extend(check(&server.client, &shared).await);

    // Every erasure ended verified, and left nothing: not pending, not served.
    let receipts = shared.receipts.lock().expect("not poisoned").clone();
    let mut erasures_pending = 0;
    for receipt_id in &receipts {
        let receipt = server
            .client
            .erasure_status(receipt_id)
            .await
            .expect("receipt");
        let state = server
            .client
            .get_user_state(receipt.user_id)
            .await
            .expect("state");
        // The pseudonym key is the last thing that links the audit log to the user.
        let trail = server
            .client
            .audit_trail(receipt.user_id, 1)
            .await
            .expect("trail");
        if !receipt.verified
            || state.erasure_state != ErasureState::Erased as i32
            || !trail.user_pseudonym.is_empty()
        {
            erasures_pending += 1;
        }
    }

    let tally = &shared.tally;
    let count = |counter: &AtomicU64| counter.load(Ordering::SeqCst);
    eprintln!(
        "stress (seed {seed}): {} writes applied, {} refused whole; {} state changes, {} \
         erasures, {} bulk-load commits, {} bundle reloads; {} races (a write or commit in \
         flight when one of its users' state changed); {} checks judged {} cells; {} forbidden \
         values seen; {} erasures pending or with data left",
        count(&tally.writes_applied),
        count(&tally.writes_refused),
        count(&tally.state_changes),
        count(&tally.erasures),
        count(&tally.commits),
        count(&tally.reloads),
        count(&tally.races),
        count(&tally.checks),
        count(&tally.cells_judged),
        forbidden_seen.len(),
        erasures_pending,
    );
    assert_eq!(forbidden_seen, Vec::<String>::new(), "seed {seed}");
    assert_eq!(erasures_pending, 0, "seed {seed}");
    assert!(
        count(&tally.races) > 0 && count(&tally.cells_judged) > 0,
        "the run exercised races and judged values (seed {seed})"
    );
}
