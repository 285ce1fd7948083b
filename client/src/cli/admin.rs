//! The admin commands: the policy in force and its reload, the audit log's verification,
//! the retention sweep, backups and the store's figures.

use super::*;

#[derive(Debug, Subcommand)]
pub(super) enum AdminCommand {
    /// Show the policy bundle in force and the progress of the latest purge (admin role).
    Policy,
    /// Load the server's policy bundle file again (admin role); the same as SIGHUP.
    ReloadPolicy,
    /// Check the audit log's hash chain (admin role); exits with 4 when it is broken.
    VerifyAudit,
    /// Remove expired values from the data files now (admin role).
    Sweep,
    /// Write a backup of the database on the server (admin role).
    Backup,
    /// Show what the server holds and runs with (admin role): users, rows and bytes per
    /// surface, storage figures, the bundle in force, uptime; --config adds the
    /// configuration in force (token hashes masked).
    Stats {
        /// Also print the configuration in force.
        #[arg(long)]
        config: bool,
    },
}

/// Runs one of these commands.
pub(super) async fn run(
    command: AdminCommand,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    match command {
        AdminCommand::Policy => {
            let status = client.policy_status().await.map_err(call)?;
            print_policy_status(out, &status)?;
            Ok(EXIT_SUCCESS)
        }
        AdminCommand::ReloadPolicy => {
            let status = client.reload_policy().await.map_err(call)?;
            print_policy_status(out, &status)?;
            Ok(EXIT_SUCCESS)
        }
        AdminCommand::VerifyAudit => verify_audit(client, call, out).await,
        AdminCommand::Sweep => {
            let report = client.sweep_expired().await.map_err(call)?;
            writeln!(
                out,
                "swept {} users, removed {} values",
                report.users_swept, report.values_removed
            )?;
            Ok(EXIT_SUCCESS)
        }
        AdminCommand::Backup => {
            let backup = client.create_backup().await.map_err(call)?;
            writeln!(out, "backup written to {} on the server", backup.path)?;
            Ok(EXIT_SUCCESS)
        }
        AdminCommand::Stats { config } => {
            let stats = client.stats().await.map_err(call)?;
            print_stats(out, &stats)?;
            if config {
                writeln!(out)?;
                write!(out, "{}", stats.config)?;
            }
            Ok(EXIT_SUCCESS)
        }
    }
}

async fn verify_audit(
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let verification = client.verify_audit_log().await.map_err(call)?;
    if verification.intact {
        writeln!(
            out,
            "audit log intact: {} records checked in {} {}",
            verification.records_checked,
            verification.chains.len(),
            if verification.chains.len() == 1 {
                "chain"
            } else {
                "chains"
            }
        )?;
    } else {
        for chain in verification.chains.iter().filter(|chain| !chain.intact) {
            writeln!(
                out,
                "audit chain {} BROKEN at record {}: {} ({} records before it check out)",
                chain.partition, chain.first_broken_sequence, chain.problem, chain.records_checked
            )?;
        }
        return Ok(EXIT_AUDIT_BROKEN);
    }
    Ok(EXIT_SUCCESS)
}

pub(super) fn print_stats(out: &mut dyn Write, stats: &proto::StoreStats) -> std::io::Result<()> {
    let counted = if stats.exact {
        format!("counted ({} rows read)", stats.rows_read)
    } else {
        format!("estimated from a sample of {} rows", stats.rows_read)
    };
    let uptime = humantime::format_duration(Duration::from_secs(stats.uptime_seconds));
    let lookups = stats.block_cache_hits + stats.block_cache_misses;
    let hit_rate = if lookups == 0 {
        "no lookups yet".to_string()
    } else {
        format!(
            "{:.1}% of {lookups} lookups",
            stats.block_cache_hits as f64 * 100.0 / lookups as f64
        )
    };
    let rows = vec![
        vec!["uptime".to_string(), uptime.to_string()],
        vec![
            "policy".to_string(),
            format!("{} ({})", stats.policy_version, stats.policy_hash),
        ],
        vec![
            "policy_loaded_at".to_string(),
            format_time(stats.policy_loaded_at_unix_micros),
        ],
        vec!["users_with_rows".to_string(), stats.users.to_string()],
        vec![
            "users_with_state".to_string(),
            format!("~{}", stats.user_states_estimate),
        ],
        vec!["figures".to_string(), counted],
        vec![
            "table_file_bytes".to_string(),
            stats.table_file_bytes.to_string(),
        ],
        vec![
            "memtable_bytes".to_string(),
            stats.memtable_bytes.to_string(),
        ],
        vec![
            "pending_compaction_bytes".to_string(),
            stats.pending_compaction_bytes.to_string(),
        ],
        vec![
            "block_cache".to_string(),
            format!(
                "{} of {} bytes used",
                stats.block_cache_usage_bytes, stats.block_cache_capacity_bytes
            ),
        ],
        vec!["block_cache_hit_rate".to_string(), hit_rate],
    ];
    print_table(out, &["field", "value"], &rows)?;
    writeln!(out)?;
    let surfaces: Vec<Vec<String>> = stats
        .surfaces
        .iter()
        .map(|surface| {
            vec![
                surface.surface.clone(),
                surface.rows.to_string(),
                surface.bytes.to_string(),
            ]
        })
        .collect();
    print_table(out, &["surface", "rows", "bytes"], &surfaces)
}

pub(super) fn print_policy_status(
    out: &mut dyn Write,
    status: &proto::PolicyStatus,
) -> std::io::Result<()> {
    let purge = if status.purge_running {
        "running".to_string()
    } else if status.purge_finished_at_unix_micros > 0 {
        format!(
            "finished {}",
            format_time(status.purge_finished_at_unix_micros)
        )
    } else {
        "none".to_string()
    };
    let rows = vec![
        vec!["version".to_string(), status.version.clone()],
        vec!["hash".to_string(), status.hash.clone()],
        vec![
            "loaded_at".to_string(),
            format_time(status.loaded_at_unix_micros),
        ],
        vec!["purge".to_string(), purge],
        vec![
            "purge_users_done".to_string(),
            status.purge_users_done.to_string(),
        ],
        vec![
            "purge_values_removed".to_string(),
            status.purge_values_removed.to_string(),
        ],
    ];
    print_table(out, &["field", "value"], &rows)
}
