//! What the store asks of the cluster's nodes one by one.
//!
//! At open, that no master evicts keys under memory pressure: an evicted row would be lost
//! silently, an evicted user state would forget an objection or an erasure's tombstone.
//!
//! After an erasure, the persistence files of the nodes that hold the user's slot (its
//! master and the master's replicas) are rewritten from memory, which no longer holds the
//! user: the append-only file when it is on (`BGREWRITEAOF`), else a snapshot
//! (`BGSAVE`). A rewrite already running when the erasure deleted may have copied the
//! user's keys, so the erasure waits for one that started after it.

use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::RedisStore;
use crate::storage::{StorageError, UserFiles};

/// How often a node is asked whether its rewrite is done.
const POLL: Duration = Duration::from_millis(20);

impl UserFiles for RedisStore {
    fn rewrite_user_files(&self, user_id: u64) -> Result<String, StorageError> {
        let key = self.layout.user(user_id).state();
        let deadline = crate::clock::tokio_now() + self.rewrite_timeout;
        let connection = self.connection.clone();
        let nodes = self.run(async move {
            let mut connection = connection;
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query_async(&mut connection)
                .await?;
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut connection)
                .await?;
            Ok(nodes_of_slot(&nodes, slot))
        })?;
        if nodes.is_empty() {
            return Err(StorageError::Engine(format!(
                "redis: no node serves the slot of user {user_id}"
            )));
        }
        let mut rewritten = Vec::with_capacity(nodes.len());
        for (host, port) in nodes {
            let connection = self.connection.clone();
            let node = (host.clone(), port);
            let what = self.run(async move { rewrite(connection, node, deadline).await })?;
            rewritten.push(format!("{what} of {host}:{port}"));
        }
        Ok(rewritten.join(", "))
    }
}

impl RedisStore {
    /// Refuses a cluster whose masters may evict keys (`maxmemory-policy` other than
    /// `noeviction`). A node that does not answer `CONFIG GET` (a managed service may
    /// forbid it) is logged and trusted.
    pub(super) fn check_no_eviction(&self) -> Result<(), StorageError> {
        let connection = self.connection.clone();
        let policies = self.run(async move {
            let mut connection = connection;
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut connection)
                .await?;
            let mut policies = Vec::new();
            for (host, port) in masters(&nodes) {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                });
                let answer = connection
                    .route_command(
                        redis::cmd("CONFIG")
                            .arg("GET")
                            .arg("maxmemory-policy")
                            .clone(),
                        route,
                    )
                    .await
                    .and_then(|value| {
                        Ok(<Vec<String> as redis::FromRedisValue>::from_redis_value(
                            value,
                        )?)
                    });
                policies.push((format!("{host}:{port}"), answer));
            }
            Ok(policies)
        })?;
        for (node, answer) in policies {
            match answer {
                Ok(pair) => match pair.get(1).map(String::as_str) {
                    Some("noeviction") => {}
                    Some(policy) => {
                        return Err(StorageError::Engine(format!(
                            "the Redis node {node} evicts keys when its memory is full \
                             (maxmemory-policy {policy}): rows and user states would be lost \
                             without a trace; set maxmemory-policy noeviction"
                        )));
                    }
                    None => {}
                },
                Err(error) => tracing::warn!(
                    %node,
                    %error,
                    "cannot read the node's maxmemory-policy; it must be noeviction"
                ),
            }
        }
        Ok(())
    }
}

/// The addresses of the masters serving slots, from `CLUSTER NODES`.
fn masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<&str>>())
        .filter(|fields| {
            fields.len() > 8 && fields[2].contains("master") && !fields[2].contains("fail")
        })
        .filter_map(|fields| address(&fields))
        .collect()
}

/// A node's address from its line of `CLUSTER NODES`: `ip:port@bus-port[,hostname]`.
fn address(fields: &[&str]) -> Option<(String, u16)> {
    let (host, rest) = fields.get(1)?.split_once(':')?;
    let port = rest.split(['@', ',']).next()?.parse().ok()?;
    Some((host.to_string(), port))
}

/// The address of the master serving `slot` and of its replicas, from `CLUSTER NODES`.
fn nodes_of_slot(nodes: &str, slot: u16) -> Vec<(String, u16)> {
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|line| line.split_whitespace().collect())
        .filter(|fields: &Vec<&str>| fields.len() >= 8)
        .collect();
    let Some(master) = lines.iter().find(|fields| {
        fields[2].contains("master")
            && !fields[2].contains("fail")
            && fields[8..].iter().any(|range| serves(range, slot))
    }) else {
        return Vec::new();
    };
    let mut found: Vec<(String, u16)> = address(master).into_iter().collect();
    found.extend(
        lines
            .iter()
            .filter(|fields| {
                fields[3] == master[0] && fields[2].contains("slave") && !fields[2].contains("fail")
            })
            .filter_map(|fields| address(fields)),
    );
    found
}

/// Whether a slot range of `CLUSTER NODES` (`first-last`, or one slot) holds `slot`.
fn serves(range: &str, slot: u16) -> bool {
    let mut bounds = range.split('-').map(str::parse::<u16>);
    match (bounds.next(), bounds.next()) {
        (Some(Ok(first)), Some(Ok(last))) => (first..=last).contains(&slot),
        (Some(Ok(only)), None) => only == slot,
        _ => false,
    }
}

/// One node's persistence figures, from `INFO persistence`.
async fn persistence(
    connection: &mut ClusterConnection,
    route: &RoutingInfo,
) -> redis::RedisResult<std::collections::HashMap<String, String>> {
    let info = connection
        .route_command(redis::cmd("INFO").arg("persistence").clone(), route.clone())
        .await?;
    let info: String = redis::FromRedisValue::from_redis_value(info)?;
    Ok(info
        .lines()
        .filter_map(|line| line.trim().split_once(':'))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect())
}

/// Rewrites the node's files and waits until a rewrite started after the call has
/// finished well; says which files.
async fn rewrite(
    mut connection: ClusterConnection,
    (host, port): (String, u16),
    deadline: tokio::time::Instant,
) -> redis::RedisResult<&'static str> {
    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
    let figures = persistence(&mut connection, &route).await?;
    let aof = figures.get("aof_enabled").map(String::as_str) == Some("1");
    let (command, count, running, status, what) = if aof {
        (
            "BGREWRITEAOF",
            "aof_rewrites",
            ["aof_rewrite_in_progress", "aof_rewrite_scheduled"],
            "aof_last_bgrewrite_status",
            "the append-only file",
        )
    } else {
        (
            "BGSAVE",
            "rdb_saves",
            ["rdb_bgsave_in_progress", "rdb_bgsave_in_progress"],
            "rdb_last_bgsave_status",
            "the snapshot",
        )
    };
    let number = |figures: &std::collections::HashMap<String, String>, name: &str| {
        figures
            .get(name)
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let timed_out = || {
        redis::RedisError::from((
            redis::ErrorKind::Io,
            "the node did not finish rewriting its files in time",
        ))
    };
    // Started once no rewrite runs: a running one may have copied the user's keys.
    let started_after = loop {
        let figures = persistence(&mut connection, &route).await?;
        if running.iter().all(|name| number(&figures, name) == 0) {
            let before = number(&figures, count);
            match connection
                .route_command(redis::cmd(command), route.clone())
                .await
            {
                Ok(_) => break before,
                // Another rewrite began in between: wait for it, then start ours.
                Err(error) if error.to_string().contains("in progress") => {}
                Err(error) => return Err(error),
            }
        }
        if crate::clock::tokio_now() >= deadline {
            return Err(timed_out());
        }
        tokio::time::sleep(POLL).await;
    };
    loop {
        let figures = persistence(&mut connection, &route).await?;
        if number(&figures, count) > started_after
            && running.iter().all(|name| number(&figures, name) == 0)
        {
            return match figures.get(status).map(String::as_str) {
                Some("ok") => Ok(what),
                other => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the node's rewrite of its files failed",
                    format!("{status}: {other:?}"),
                ))),
            };
        }
        if crate::clock::tokio_now() >= deadline {
            return Err(timed_out());
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_of_a_slot_are_its_master_and_the_masters_replicas() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922 12000
c3 127.0.0.1:7002@17002 master,fail - 0 0 3 connected
d4 127.0.0.1:7003@17003 slave b2 0 0 2 connected
e5 127.0.0.1:7004@17004 slave a1 0 0 1 connected
f6 127.0.0.1:7005@17005 slave,fail b2 0 0 2 connected
";
        let port =
            |found: Vec<(String, u16)>| found.into_iter().map(|(_, port)| port).collect::<Vec<_>>();
        assert_eq!(port(nodes_of_slot(nodes, 6000)), [7001, 7003]);
        assert_eq!(port(nodes_of_slot(nodes, 12000)), [7001, 7003]);
        assert_eq!(port(nodes_of_slot(nodes, 0)), [7000, 7004]);
        assert_eq!(port(nodes_of_slot(nodes, 11000)), Vec::<u16>::new());
        assert_eq!(port(masters(nodes)), [7000, 7001]);
    }
}
