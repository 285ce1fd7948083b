//! What `GetStats` reads of a store on a Redis Cluster: rows and bytes per surface, counted
//! from the partitions' sets of users with rows (every user when there are few, else an
//! even sample of each partition, scaled). The engine figures are RocksDB's own (block
//! cache, memtables, compaction) and read as zeros here; the nodes' own figures come from
//! Redis (`INFO`).

use std::collections::BTreeMap;

use futures_util::future::join_all;

use super::{RedisStore, corrupt, decode_surfaces, mget};
use crate::registry::SurfaceId;
use crate::storage::{Census, EngineFigures, EngineStats, StorageError, SurfaceCensus};

impl EngineStats for RedisStore {
    fn engine_figures(&self) -> Result<EngineFigures, StorageError> {
        Ok(EngineFigures::default())
    }

    fn census(&self, rows_max: usize) -> Result<Census, StorageError> {
        let partitions = self.layout.partitions();
        let sets: Vec<String> = (0..partitions)
            .map(|partition| self.layout.chain(partition).users())
            .collect();
        let connection = self.connection.clone();
        let counts: Vec<u64> = self.run(async move {
            let reads = sets.iter().map(|set| {
                let mut connection = connection.clone();
                async move {
                    redis::cmd("ZCARD")
                        .arg(set)
                        .query_async::<u64>(&mut connection)
                        .await
                }
            });
            join_all(reads).await.into_iter().collect()
        })?;
        let users: u64 = counts.iter().sum();
        // Rows per user are at most the surfaces: sample users, about `rows_max` rows.
        let per_partition = (rows_max as u64 / u64::from(partitions)).max(1);
        let mut tally: BTreeMap<SurfaceId, (u64, u64)> = BTreeMap::new();
        let (mut users_read, mut rows_read) = (0u64, 0u64);
        for partition in 0..partitions {
            let chain = self.layout.chain(partition);
            let mut connection = self.connection.clone();
            let members: Vec<String> = self.run(async move {
                redis::cmd("ZRANGEBYLEX")
                    .arg(chain.users())
                    .arg("-")
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(per_partition)
                    .query_async(&mut connection)
                    .await
            })?;
            if members.is_empty() {
                continue;
            }
            let ids = members
                .iter()
                .map(|member| {
                    u64::from_str_radix(member, 16).map_err(|_| {
                        corrupt(format!("{member:?} in a set of users is not a user id"))
                    })
                })
                .collect::<Result<Vec<u64>, _>>()?;
            let indexes = self.get_many(
                ids.iter()
                    .map(|&user| self.layout.user(user).surfaces())
                    .collect(),
            )?;
            let mut rows = Vec::new();
            for (&user, index) in ids.iter().zip(indexes) {
                for surface in decode_surfaces(index.as_deref())? {
                    rows.push((surface, self.layout.user(user).row(surface)));
                }
            }
            let names: Vec<String> = rows.iter().map(|(_, name)| name.clone()).collect();
            let mut connection = self.connection.clone();
            let values = self.run(async move { mget(&mut connection, &names).await })?;
            for ((surface, name), value) in rows.iter().zip(values) {
                if let Some(bytes) = value {
                    let entry = tally.entry(*surface).or_default();
                    entry.0 += 1;
                    entry.1 += (name.len() + bytes.len()) as u64;
                    rows_read += 1;
                }
            }
            users_read += ids.len() as u64;
        }
        let exact = users_read == users;
        let scale = if exact || users_read == 0 {
            1.0
        } else {
            users as f64 / users_read as f64
        };
        Ok(Census {
            exact,
            rows_read,
            users,
            surfaces: tally
                .into_iter()
                .map(|(surface, (rows, bytes))| SurfaceCensus {
                    surface,
                    rows: (rows as f64 * scale).round() as u64,
                    bytes: (bytes as f64 * scale).round() as u64,
                })
                .collect(),
        })
    }
}
