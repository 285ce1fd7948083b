//! Many users' changes at once, in waves: every user's snapshot read at once (one `MGET`
//! per user, all sent together), decided in Rust, every step sent at once, then one `WAIT`
//! per slot written (a node answers the first once its replicas have everything the
//! connection wrote, and the others at once). The users whose step found something moved
//! are read and decided again in the next wave.

use futures_util::future::join_all;
use redis::cluster_routing::SingleNodeRoutingInfo;

use super::keys::UserKeys;
use super::step::{self, Step};
use super::{RedisStore, Snapshot, StorageError, retried};

impl RedisStore {
    /// The snapshots of several users, each with its `extra` keys, read at once.
    pub(super) fn snapshots(
        &self,
        users: &[(UserKeys, Vec<String>)],
    ) -> Result<Vec<Snapshot>, StorageError> {
        let names: Vec<Vec<String>> = users
            .iter()
            .map(|(keys, extra)| Snapshot::keys(keys, extra.clone()))
            .collect();
        let values = self
            .get_groups(names)?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(super::engine)?;
        users
            .iter()
            .zip(values)
            .map(|((keys, _), values)| Snapshot::decode(keys, values))
            .collect()
    }

    /// Applies every step at once, then waits for the replicas of every slot written;
    /// whether each step wrote (`false`: a compared key had moved, nothing was written).
    pub(super) fn execute_all(&self, steps: &[Step]) -> Result<Vec<bool>, StorageError> {
        let routed: Vec<(redis::Cmd, SingleNodeRoutingInfo)> = steps
            .iter()
            .filter_map(|step| Some((step.command(), step.route()?)))
            .collect();
        let mut waits: Vec<SingleNodeRoutingInfo> = Vec::new();
        for (_, route) in &routed {
            if !waits.contains(route) {
                waits.push(route.clone());
            }
        }
        let wait = self.wait;
        let connection = self.connection.clone();
        let (answers, confirmed) = self.run(async move {
            let writes = routed.into_iter().map(|(command, route)| {
                let connection = connection.clone();
                let mut pipeline = redis::pipe();
                pipeline.add_command(command);
                retried(move || {
                    let (mut connection, pipeline, route) =
                        (connection.clone(), pipeline.clone(), route.clone());
                    async move { connection.route_pipeline(pipeline, 0, 1, route).await }
                })
            });
            let answers = join_all(writes)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?;
            let mut confirmed = Vec::new();
            if let Some((replicas, timeout)) = wait {
                let waits = waits.into_iter().map(|route| {
                    let mut connection = connection.clone();
                    async move {
                        let mut pipeline = redis::pipe();
                        pipeline
                            .cmd("WAIT")
                            .arg(replicas)
                            .arg(timeout.as_millis().max(1) as u64);
                        connection.route_pipeline(pipeline, 0, 1, route).await
                    }
                });
                confirmed = join_all(waits)
                    .await
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()?;
            }
            Ok((answers, confirmed))
        })?;
        let mut written = Vec::with_capacity(steps.len());
        let mut answers = answers.into_iter();
        for step in steps {
            if step.route().is_none() {
                written.push(true);
                continue;
            }
            let answer = answers.next().unwrap_or_default();
            written.push(answer.first().and_then(step::written).ok_or_else(|| {
                StorageError::Engine(format!("redis: the step answered {answer:?}"))
            })?);
        }
        for answer in confirmed {
            self.check_confirmed(answer.first())?;
        }
        Ok(written)
    }
}
