//! A Redis Cluster on loopback for the tests: six `redis-server` processes (three masters,
//! each with a replica) in a temporary directory, joined with `redis-cli --cluster create`,
//! stopped (killed) when dropped. A master can be killed to test a failover. Each node runs
//! under a small shell that kills it (and removes its files) when the test process closes
//! the shell's input, so that nodes never outlive the tests, even those of the cluster the
//! tests of one process share ([`shared`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// Nodes of the cluster: three masters and their replicas.
const NODES: usize = 6;
/// How long a node may be unreachable before its replica takes over, in milliseconds.
pub const NODE_TIMEOUT_MILLIS: u64 = 2_000;

/// A running cluster.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    directory: TempDir,
}

#[derive(Debug)]
struct Node {
    port: u16,
    process: Option<Child>,
}

impl RedisCluster {
    /// Starts the nodes, joins them, and waits until every node says the cluster is ok
    /// (about two seconds). Panics with the nodes' logs when it does not come up.
    pub async fn start() -> RedisCluster {
        let directory = tempfile::tempdir().expect("a directory for the cluster");
        let ports = free_ports();
        let nodes = ports
            .iter()
            .map(|&port| Node {
                port,
                process: Some(start_node(directory.path(), port)),
            })
            .collect();
        let cluster = RedisCluster { nodes, directory };
        let mut ticks = crate::poll_every(Duration::from_millis(20));
        for node in &cluster.nodes {
            let started = std::time::Instant::now();
            while cli(node.port, &["ping"]).as_deref() != Some("PONG") {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "redis-server on port {} did not answer: {}",
                    node.port,
                    cluster.logs()
                );
                ticks.tick().await;
            }
        }
        let addresses: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_until_ok().await;
        cluster.wait_for_replicas().await;
        cluster
    }

    /// Waits until every master's replica has synchronized with it and follows its
    /// changes, so that a write can be confirmed by one replica (`WAIT 1`).
    async fn wait_for_replicas(&self) {
        let started = std::time::Instant::now();
        let mut ticks = crate::poll_every(Duration::from_millis(20));
        loop {
            let synced = self
                .master_ports()
                .into_iter()
                .all(|port| self.has_replica(port));
            if synced {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the replicas did not synchronize: {}",
                self.logs()
            );
            ticks.tick().await;
        }
    }

    /// The directory holding every node's files (its append-only file among them).
    pub fn directory(&self) -> &Path {
        self.directory.path()
    }

    /// Seed URLs of the cluster, one per node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}/", node.port))
            .collect()
    }

    /// The ports of the masters that serve slots now, in the view of a live node.
    pub fn master_ports(&self) -> Vec<u16> {
        self.live_port()
            .map(|port| roles(port).masters)
            .unwrap_or_default()
    }

    /// Kills the node on `port` at once (SIGKILL), as a crash would; its files stay for
    /// [`RedisCluster::restart`].
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        if let Some(mut process) = node.process.take() {
            if let Some(mut input) = process.stdin.take() {
                use std::io::Write;
                let _ = input.write_all(b"keep\n");
            }
            let _ = process.wait();
        }
    }

    /// Starts a killed node again on its files: it rejoins the cluster (as the replica of
    /// whichever node took its slots over).
    pub fn restart(&mut self, port: u16) {
        let directory = self.directory.path().to_path_buf();
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        assert!(node.process.is_none(), "node {port} is running");
        node.process = Some(start_node(&directory, port));
    }

    /// Waits until every live node says the cluster is ok (all slots served).
    pub async fn wait_until_ok(&self) {
        let started = std::time::Instant::now();
        let mut ticks = crate::poll_every(Duration::from_millis(50));
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|node| node.process.is_some())
                .all(|node| {
                    cli(node.port, &["cluster", "info"]).is_some_and(|info| {
                        info.lines().any(|line| line.trim() == "cluster_state:ok")
                    })
                });
            if ok {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the cluster did not become ok: {}",
                self.logs()
            );
            ticks.tick().await;
        }
    }

    /// The port of the master serving `key`'s slot now, in the view of the first live node
    /// that answers.
    pub fn master_of(&self, key: &str) -> Option<u16> {
        self.live_ports()
            .into_iter()
            .find_map(|port| master_of_in_view_of(port, key))
    }

    /// A figure of `INFO` (e.g. `used_memory`, `process_id`) of the live node on `port`.
    pub fn info_figure(&self, port: u16, name: &str) -> Option<u64> {
        let prefix = format!("{name}:");
        cli(port, &["info"])?
            .lines()
            .find_map(|line| line.trim().strip_prefix(&prefix)?.parse().ok())
    }

    /// The ports of the live nodes.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.process.is_some())
            .map(|node| node.port)
            .collect()
    }

    /// Moves `slots` hash slots, with their keys, from the master on `from` to the master
    /// on `to`, as an operator rebalancing the cluster would (`redis-cli --cluster
    /// reshard`: each slot marked migrating, its keys moved, then handed over). Blocks
    /// until done.
    pub fn reshard(&self, from: u16, to: u16, slots: u32) {
        let id = |port: u16| cli(port, &["cluster", "myid"]).expect("a node id");
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{from}"))
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            output.status.success(),
            "resharding failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }

    /// The port of the replica following the master on `port`, if one does.
    pub fn replica_of(&self, port: u16) -> Option<u16> {
        cli(port, &["info", "replication"])?
            .lines()
            .find_map(|line| {
                line.strip_prefix("slave0:")?
                    .split(',')
                    .find_map(|field| field.strip_prefix("port=")?.parse().ok())
            })
    }

    /// Whether the master on `port` has a replica that follows it.
    pub fn has_replica(&self, port: u16) -> bool {
        cli(port, &["info", "replication"]).is_some_and(|info| {
            info.lines()
                .any(|line| line.starts_with("slave0:") && line.contains("state=online"))
        })
    }

    fn live_port(&self) -> Option<u16> {
        self.nodes
            .iter()
            .find(|node| node.process.is_some())
            .map(|node| node.port)
    }

    /// The last lines of every node's log, for a failure message.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                let log = std::fs::read_to_string(log_path(self.directory.path(), node.port))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                format!(
                    "\n[{}] {}",
                    node.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(process) = node.process.take() {
                stop_node(process);
            }
        }
    }
}

/// The cluster every test of this process may share, each under its own key prefix:
/// started by the first test that asks, stopped when the process ends. Tests that stop
/// nodes start a cluster of their own.
pub fn shared() -> &'static RedisCluster {
    static SHARED: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        // Started on a thread of its own, whatever runtime the asking test runs on.
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to start the cluster")
                .block_on(RedisCluster::start())
        })
        .join()
        .expect("the shared cluster starts")
    })
}

/// A key prefix no other test of this process uses.
pub fn unique_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "t{}-",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn log_path(directory: &Path, port: u16) -> PathBuf {
    directory.join(port.to_string()).join("redis.log")
}

/// Closes the node's shell's input: the shell kills the node (SIGKILL) and removes its
/// files (it keeps them when it reads `keep` first); then waits for the shell.
fn stop_node(mut process: Child) {
    drop(process.stdin.take());
    let _ = process.wait();
}

/// Starts `redis-server` under a shell that waits for its own input to close, then kills
/// the node at once and removes the node's directory.
fn start_node(directory: &Path, port: u16) -> Child {
    let data = directory.join(port.to_string());
    std::fs::create_dir_all(&data).expect("a node's directory");
    Command::new("sh")
        .arg("-c")
        .arg(
            r#"dir=$1; shift; redis-server "$@" & node=$!; read -r line; kill -9 "$node"; wait "$node"; [ "$line" = keep ] || rm -rf "$dir""#,
        )
        .arg("sh")
        .arg(&data)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MILLIS.to_string()])
        // The masters that are up keep serving their slots while another fails over.
        .args(["--cluster-require-full-coverage", "no"])
        .args(["--appendonly", "yes"])
        .args(["--save", ""])
        .arg("--dir")
        .arg(&data)
        .arg("--logfile")
        .arg(log_path(directory, port))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (./dev test installs it)")
}

/// What one node sees of the cluster's nodes.
struct Roles {
    /// Ports of the masters serving slots, not failed.
    masters: Vec<u16>,
    /// Replicas not failed.
    replicas: usize,
}

fn roles(port: u16) -> Roles {
    let mut roles = Roles {
        masters: Vec::new(),
        replicas: 0,
    };
    for line in cli(port, &["cluster", "nodes"]).unwrap_or_default().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        if flags.contains("fail") {
            continue;
        }
        let flags: Vec<&str> = flags.split(',').collect();
        if flags.contains(&"slave") {
            roles.replicas += 1;
        } else if flags.contains(&"master")
            && fields.len() > 8
            && let Some(port) = address
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
        {
            roles.masters.push(port);
        }
    }
    roles
}

/// The answer of `redis-cli -p port args...`, or `None` when the node does not answer.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (output.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

/// Six ports whose cluster-bus ports (port + 10000) are free too: each asked of the
/// system by binding port 0, then released for the node to take.
fn free_ports() -> Vec<u16> {
    let mut ports = Vec::with_capacity(NODES);
    while ports.len() < NODES {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let bus_free = port
            .checked_add(10_000)
            .is_some_and(|bus| TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free && !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// The port of the master serving `key`'s slot, in the view of the node on `port`.
fn master_of_in_view_of(port: u16, key: &str) -> Option<u16> {
    let slot: u16 = cli(port, &["cluster", "keyslot", key])?.parse().ok()?;
    for line in cli(port, &["cluster", "nodes"])?.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
            continue;
        }
        let serves = fields[8..].iter().any(|range| {
            let mut bounds = range
                .split('-')
                .filter_map(|bound| bound.parse::<u16>().ok());
            match (bounds.next(), bounds.next()) {
                (Some(first), Some(last)) => (first..=last).contains(&slot),
                (Some(only), None) => only == slot,
                _ => false,
            }
        });
        if serves {
            return fields[1].split(['@', ':']).nth(1)?.parse().ok();
        }
    }
    None
}
