//! The storage engine's figures as metrics: gauges and counters set from
//! [`EngineFigures`] at every scrape.

use super::*;

/// RocksDB's figures, set at each scrape.
#[derive(Default)]
pub(super) struct RocksdbGauges {
    rows_estimate: Gauge,
    user_states_estimate: Gauge,
    table_file_bytes: Gauge,
    memtable_bytes: Gauge,
    pending_compaction_bytes: Gauge,
    running_compactions: Gauge,
    block_cache_usage_bytes: Gauge,
    block_cache_capacity_bytes: Gauge,
    block_cache_hits: Counter,
    block_cache_misses: Counter,
    row_cache_usage_bytes: Gauge,
    row_cache_capacity_bytes: Gauge,
    row_cache_hits: Counter,
    row_cache_misses: Counter,
    write_stall_seconds: Counter<f64, AtomicU64>,
    writes_stopped: Gauge,
}

impl RocksdbGauges {
    pub(super) fn register(&self, registry: &mut Registry) {
        let gauges: [(&str, &str, &Gauge); 11] = [
            (
                "estimated_rows",
                "RocksDB's estimate of the (user, surface) rows stored",
                &self.rows_estimate,
            ),
            (
                "estimated_user_states",
                "RocksDB's estimate of the users with a stored privacy state",
                &self.user_states_estimate,
            ),
            (
                "table_file_bytes",
                "Bytes of table (SST) files, over every column family",
                &self.table_file_bytes,
            ),
            (
                "memtable_bytes",
                "Bytes in memtables, over every column family",
                &self.memtable_bytes,
            ),
            (
                "pending_compaction_bytes",
                "Bytes compaction has to rewrite to bring the levels to their targets",
                &self.pending_compaction_bytes,
            ),
            (
                "running_compactions",
                "Compactions running now",
                &self.running_compactions,
            ),
            (
                "block_cache_usage_bytes",
                "Bytes held in the block cache",
                &self.block_cache_usage_bytes,
            ),
            (
                "block_cache_capacity_bytes",
                "Capacity of the block cache",
                &self.block_cache_capacity_bytes,
            ),
            (
                "row_cache_usage_bytes",
                "Bytes held in the row cache in front of RocksDB",
                &self.row_cache_usage_bytes,
            ),
            (
                "row_cache_capacity_bytes",
                "Capacity of the row cache (0: none)",
                &self.row_cache_capacity_bytes,
            ),
            (
                "writes_stopped",
                "1 while RocksDB stops writes until compaction catches up",
                &self.writes_stopped,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "block_cache_hits",
            "Block cache lookups that found their block (statistics on)",
            self.block_cache_hits.clone(),
        );
        registry.register(
            "block_cache_misses",
            "Block cache lookups that read the block from a file (statistics on)",
            self.block_cache_misses.clone(),
        );
        registry.register(
            "row_cache_hits",
            "Rows read that the row cache held",
            self.row_cache_hits.clone(),
        );
        registry.register(
            "row_cache_misses",
            "Rows read from RocksDB because the row cache did not hold them",
            self.row_cache_misses.clone(),
        );
        registry.register(
            "write_stall_seconds",
            "Time writes were delayed or stopped by RocksDB (statistics on)",
            self.write_stall_seconds.clone(),
        );
    }

    pub(super) fn set(&self, figures: &crate::storage::EngineFigures) {
        let gauge = |gauge: &Gauge, value: u64| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        gauge(&self.rows_estimate, figures.rows_estimate);
        gauge(&self.user_states_estimate, figures.user_states_estimate);
        gauge(&self.table_file_bytes, figures.table_file_bytes);
        gauge(&self.memtable_bytes, figures.memtable_bytes);
        gauge(
            &self.pending_compaction_bytes,
            figures.pending_compaction_bytes,
        );
        gauge(&self.running_compactions, figures.running_compactions);
        gauge(
            &self.block_cache_usage_bytes,
            figures.block_cache_usage_bytes,
        );
        gauge(
            &self.block_cache_capacity_bytes,
            figures.block_cache_capacity_bytes,
        );
        gauge(&self.row_cache_usage_bytes, figures.row_cache_usage_bytes);
        gauge(
            &self.row_cache_capacity_bytes,
            figures.row_cache_capacity_bytes,
        );
        gauge(&self.writes_stopped, u64::from(figures.writes_stopped));
        // RocksDB keeps these totals itself; the counters catch up to them.
        let catch_up = |counter: &Counter, total: u64| {
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        catch_up(&self.block_cache_hits, figures.block_cache_hits);
        catch_up(&self.block_cache_misses, figures.block_cache_misses);
        catch_up(&self.row_cache_hits, figures.row_cache_hits);
        catch_up(&self.row_cache_misses, figures.row_cache_misses);
        let stalled = figures.write_stall_micros as f64 / 1e6;
        let counted = self.write_stall_seconds.get();
        if stalled > counted {
            self.write_stall_seconds.inc_by(stalled - counted);
        }
    }
}
