//! The operator CLI (`featurestore`): lists the registry, writes features from JSON,
//! bulk-loads and generates backfill files, runs the privacy and admin calls, and reads
//! features as a table or JSON. Lives in the library so that tests drive it in-process
//! against a real server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::path::PathBuf;

use crate::generate::{GenerateOptions, generate};
use crate::load::formats::FileFormat;
use crate::load::{LoadOptions, load};
use crate::{Client, ClientOptions};
use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use featurestore::domain::{AgeBand, ReadKey, ReadRequest, UserStateUpdate};
use featurestore::proto;
use serde_json::{Map, Value as Json, json};

/// Operator CLI of the feature store.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Server address.
    #[arg(
        long,
        env = "FEATURESTORE_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    endpoint: String,
    /// Deadline of each call, e.g. 500ms or 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// Bearer token of the caller's principal.
    #[arg(
        long,
        env = "FEATURESTORE_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Certificate authority (PEM) that signed the server's certificate; needed for an
    /// https:// endpoint.
    #[arg(long, env = "FEATURESTORE_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// The client's certificate (PEM), for mutual TLS; with --tls-key.
    #[arg(
        long,
        env = "FEATURESTORE_TLS_CERT",
        global = true,
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// The client's private key (PEM), for mutual TLS; with --tls-cert.
    #[arg(
        long,
        env = "FEATURESTORE_TLS_KEY",
        global = true,
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// The name the server's certificate must hold, when not the endpoint's host.
    #[arg(long, env = "FEATURESTORE_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the registered features.
    Features,
    /// List the registered surfaces.
    Surfaces,
    /// Write feature rows from a JSON file (or standard input); see the README for the
    /// format. Exits with 3 when any value was refused.
    Write {
        /// JSON file; standard input when absent or "-".
        file: Option<String>,
    },
    /// Decide a write from a JSON file without storing it: the verdicts, the rules that
    /// fired on each surface, and the policy bundle that decided. Exits with 3 when any
    /// value would be refused.
    Explain {
        /// JSON file; standard input when absent or "-".
        file: Option<String>,
    },
    /// Create or replace a user's state (privacy role); prints the new state.
    SetUser {
        user_id: u64,
        /// ISO 3166 code such as DE, GB, KR, US or US-CA; empty for unknown.
        #[arg(long, default_value = "")]
        jurisdiction: String,
        #[arg(long, value_enum)]
        age: AgeArg,
        /// Apps whose accounts are linked, e.g. facebook,instagram.
        #[arg(long = "linked", value_delimiter = ',')]
        linked_apps: Vec<String>,
        /// The user objected to ad personalization.
        #[arg(long)]
        ads_objection: bool,
        /// Apply only if the state is still at this generation.
        #[arg(long)]
        expected_generation: Option<u64>,
    },
    /// Show a user's state (privacy role).
    GetUser { user_id: u64 },
    /// Show the policy bundle in force and the progress of the latest purge (admin role).
    Policy,
    /// Load the server's policy bundle file again (admin role); the same as SIGHUP.
    ReloadPolicy,
    /// Show a user's audit trail (privacy role).
    Audit {
        user_id: u64,
        /// Most records to show.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Check the audit log's hash chain (admin role); exits with 4 when it is broken.
    VerifyAudit,
    /// Remove expired values from the data files now (admin role).
    Sweep,
    /// Erase a user (privacy role) and print the receipt.
    Erase { user_id: u64 },
    /// Show an erasure's receipt (privacy role).
    ErasureStatus { receipt_id: String },
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
    /// Bulk-load a JSON Lines, CSV or Parquet file (see the README for its columns) into
    /// a job, with progress on stderr, and commit it. Re-run with the same --job to resume
    /// an interrupted load. Prints the summary; exits with 3 when any row was refused,
    /// transformed or malformed.
    Load {
        file: PathBuf,
        /// Job id: letters, digits, '.', '_', '-'.
        #[arg(long)]
        job: String,
        /// The file's format; from its extension (.jsonl, .csv, .parquet) when absent.
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Rows per chunk; a resumed job must use the size it started with.
        #[arg(long, default_value_t = 4096)]
        chunk_rows: usize,
        /// Chunks sent ahead of their acknowledgement.
        #[arg(long, default_value_t = 4)]
        in_flight: usize,
        /// Stop at the first malformed record instead of reporting it and going on.
        #[arg(long)]
        strict: bool,
        /// Leave the job open after the last chunk instead of committing it.
        #[arg(long)]
        no_commit: bool,
        /// Producer id of rows without a producer_id column.
        #[arg(long)]
        producer: Option<String>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Show a bulk-load job and its summary.
    LoadStatus { job: String },
    /// Abort an open bulk-load job: none of its rows is applied.
    LoadAbort { job: String },
    /// List recent bulk-load jobs.
    LoadJobs {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Write a realistic backfill file (one row per user) for the server's registered
    /// features, to try `load` or to benchmark it.
    Generate {
        file: PathBuf,
        /// Number of users (rows).
        #[arg(long)]
        users: u64,
        /// The format; from the extension when absent.
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Id of the first user.
        #[arg(long, default_value_t = 1)]
        first_user: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Source of every row.
        #[arg(long, default_value = "ai_chat")]
        source: String,
        /// Target surfaces of every row.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "facebook_feed,instagram_reels"
        )]
        surfaces: Vec<String>,
        /// Features to fill (every feature the source may produce on the surfaces when
        /// absent).
        #[arg(long = "feature", value_delimiter = ',')]
        features: Vec<String>,
        #[arg(long, default_value = "generator@v1")]
        producer: String,
        /// App of every interaction (half facebook, half instagram when absent).
        #[arg(long)]
        origin_app: Option<String>,
    },
    /// Read features for (user, surface) keys.
    Read {
        /// Surface of every --user.
        #[arg(long)]
        surface: Option<String>,
        /// User ids to read on --surface.
        #[arg(long = "user", value_delimiter = ',')]
        users: Vec<u64>,
        /// Explicit keys as USER:SURFACE.
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Features to return (all of the surfaces' features when absent).
        #[arg(long = "feature", value_delimiter = ',')]
        features: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AgeArg {
    Unknown,
    Minor,
    Adult,
}

impl From<AgeArg> for AgeBand {
    fn from(age: AgeArg) -> Self {
        match age {
            AgeArg::Unknown => AgeBand::Unknown,
            AgeArg::Minor => AgeBand::Minor,
            AgeArg::Adult => AgeBand::Adult,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Exit status when every call succeeded and nothing was refused.
pub const EXIT_SUCCESS: u8 = 0;
/// Exit status when the command failed (the error is returned).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of `write` when any value was refused on some surface.
pub const EXIT_REFUSED: u8 = 3;
/// Exit status of `verify-audit` when the audit log's chain is broken.
pub const EXIT_AUDIT_BROKEN: u8 = 4;

/// Runs one CLI command, printing its answer to `out`; returns the exit status.
pub async fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let tls = if args.tls_ca.is_some() || args.tls_cert.is_some() {
        Some(crate::ClientTls::from_files(
            args.tls_ca.as_deref(),
            args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
            args.tls_domain.clone(),
        )?)
    } else {
        None
    };
    let options = ClientOptions {
        timeout: args.timeout,
        token: args.token.clone().map(crate::BearerToken),
        tls,
        ..ClientOptions::default()
    };
    let client = Client::connect(&args.endpoint, options)?;
    let call = |error: crate::ClientError| {
        let request = error
            .request_id()
            .map(|id| format!(", request id {id}"))
            .unwrap_or_default();
        match error.policy_refusal() {
            Some(refusal) => anyhow!(
                "{error} (the user's state is at generation {}; server {}{request})",
                refusal.current_generation,
                args.endpoint
            ),
            None => anyhow!("{error} (server {}{request})", args.endpoint),
        }
    };
    match args.command {
        Command::Features => {
            let features = client.list_features().await.map_err(call)?;
            let rows = features
                .iter()
                .map(|feature| {
                    vec![
                        feature.name.clone(),
                        type_name(feature.value_type, feature.dimension),
                        feature.sources.join(","),
                        sensitivity_name(feature.sensitivity),
                        format_ttl(feature.ttl_seconds),
                        feature.surfaces.join(","),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                out,
                &[
                    "feature",
                    "type",
                    "sources",
                    "sensitivity",
                    "ttl",
                    "surfaces",
                ],
                &rows,
            )?;
        }
        Command::Surfaces => {
            let surfaces = client.list_surfaces().await.map_err(call)?;
            let rows = surfaces
                .iter()
                .map(|surface| {
                    let purpose =
                        proto::Purpose::try_from(surface.purpose).map_or("?", |purpose| {
                            match purpose {
                                proto::Purpose::Content => "content",
                                proto::Purpose::Ads => "ads",
                                proto::Purpose::Unspecified => "?",
                            }
                        });
                    vec![
                        surface.name.clone(),
                        surface.app.clone(),
                        purpose.to_string(),
                        surface.description.clone(),
                    ]
                })
                .collect::<Vec<_>>();
            print_table(out, &["surface", "app", "purpose", "description"], &rows)?;
        }
        Command::Write { file } => {
            let text = read_input(file.as_deref())?;
            let features = client.list_features().await.map_err(call)?;
            let request = write_request_from_json(&text, &features)?;
            let response = client
                .write_features_raw(request.clone())
                .await
                .map_err(call)?;
            return Ok(print_write(out, &request, &response)?);
        }
        Command::Explain { file } => {
            let text = read_input(file.as_deref())?;
            let features = client.list_features().await.map_err(call)?;
            let request = write_request_from_json(&text, &features)?;
            let response = client
                .explain_write_raw(request.clone())
                .await
                .map_err(call)?;
            writeln!(out, "policy bundle {}", response.policy_bundle_hash)?;
            return match response.verdicts {
                Some(verdicts) => Ok(print_write(out, &request, &verdicts)?),
                None => {
                    let reason = proto::ReasonCode::try_from(response.request_refusal)
                        .map_or("?", |reason| {
                            reason.as_str_name().trim_start_matches("REASON_CODE_")
                        });
                    writeln!(
                        out,
                        "the whole request would be refused: {reason} (rows[{}])",
                        response.refused_row
                    )?;
                    Ok(EXIT_REFUSED)
                }
            };
        }
        Command::SetUser {
            user_id,
            jurisdiction,
            age,
            linked_apps,
            ads_objection,
            expected_generation,
        } => {
            let state = client
                .set_user_state(UserStateUpdate {
                    user_id,
                    jurisdiction,
                    age_band: age.into(),
                    linked_apps,
                    ads_objection,
                    expected_generation,
                })
                .await
                .map_err(call)?;
            print_user_state(out, &state)?;
        }
        Command::Audit { user_id, limit } => {
            let trail = client.audit_trail(user_id, limit).await.map_err(call)?;
            writeln!(
                out,
                "user {user_id} is {} in the audit log",
                trail.user_pseudonym
            )?;
            let rows = trail
                .records
                .iter()
                .map(|record| {
                    let reasons = record
                        .reasons
                        .iter()
                        .map(|&reason| reason_label(reason))
                        .collect::<Vec<_>>()
                        .join(",");
                    vec![
                        format!("{}/{}", record.partition, record.sequence),
                        format_time(record.time_unix_micros),
                        record.action.clone(),
                        record.caller.clone(),
                        record.subject.clone(),
                        record.surfaces.join(","),
                        reasons,
                    ]
                })
                .collect::<Vec<_>>();
            print_table(
                out,
                &[
                    "chain/seq",
                    "time",
                    "action",
                    "caller",
                    "subject",
                    "surfaces",
                    "reasons",
                ],
                &rows,
            )?;
        }
        Command::Erase { user_id } => {
            let receipt = client.erase_user(user_id).await.map_err(call)?;
            print_receipt(out, &receipt)?;
        }
        Command::ErasureStatus { receipt_id } => {
            let receipt = client.erasure_status(&receipt_id).await.map_err(call)?;
            print_receipt(out, &receipt)?;
        }
        Command::Load {
            file,
            job,
            format,
            chunk_rows,
            in_flight,
            strict,
            no_commit,
            producer,
            quiet,
        } => {
            let options = LoadOptions {
                format,
                chunk_rows,
                chunks_in_flight: in_flight,
                strict,
                commit: !no_commit,
                producer,
                progress: !quiet,
                ..LoadOptions::new(file, job)
            };
            let report = load(&client, &options).await?;
            if report.already_committed {
                writeln!(
                    out,
                    "job {} was already committed; nothing sent",
                    report.job.job_id
                )?;
            } else {
                let rate = report.records as f64 / report.elapsed.as_secs_f64().max(1e-3);
                writeln!(
                    out,
                    "read {} records in {:.1} s ({rate:.0} rows/s, commit {:.1} s){}",
                    report.records,
                    report.elapsed.as_secs_f64(),
                    report.commit_elapsed.as_secs_f64(),
                    if report.resumed_after_chunk > 0 {
                        format!("; resumed after chunk {}", report.resumed_after_chunk)
                    } else {
                        String::new()
                    }
                )?;
            }
            if report.bad_lines > 0 {
                writeln!(out, "{} malformed lines, not sent", report.bad_lines)?;
            }
            for (line, problem) in &report.bad_line_examples {
                writeln!(out, "  line {line}: {problem}")?;
            }
            print_load_job(out, &report.job)?;
            let summary = report.job.summary.unwrap_or_default();
            if report.bad_lines
                + summary.rows_denied
                + summary.rows_transformed
                + summary.rows_invalid
                > 0
            {
                return Ok(EXIT_REFUSED);
            }
        }
        Command::LoadStatus { job } => {
            let job = client.load_job(&job).await.map_err(call)?;
            print_load_job(out, &job)?;
        }
        Command::LoadAbort { job } => {
            let job = client.abort_load(&job).await.map_err(call)?;
            print_load_job(out, &job)?;
        }
        Command::LoadJobs { limit } => {
            let jobs = client.load_jobs(limit).await.map_err(call)?;
            let rows: Vec<Vec<String>> = jobs
                .iter()
                .map(|job| {
                    let summary = job.summary.clone().unwrap_or_default();
                    vec![
                        job.job_id.clone(),
                        proto::LoadJobState::try_from(job.state).map_or("?".to_string(), |state| {
                            enum_name(state.as_str_name(), "LOAD_JOB_STATE_")
                        }),
                        job.last_durable_chunk.to_string(),
                        summary.rows_received.to_string(),
                        (summary.rows_accepted + summary.rows_transformed).to_string(),
                        summary.rows_denied.to_string(),
                    ]
                })
                .collect();
            print_table(
                out,
                &["job", "state", "chunks", "rows", "admitted", "denied"],
                &rows,
            )?;
        }
        Command::Generate {
            file,
            users,
            format,
            first_user,
            seed,
            source,
            surfaces,
            features,
            producer,
            origin_app,
        } => {
            let format = match format {
                Some(format) => format,
                None => FileFormat::of_path(&file).with_context(|| {
                    format!(
                        "cannot tell the format of {} from its extension",
                        file.display()
                    )
                })?,
            };
            let registry = client.list_features().await.map_err(call)?;
            let options = GenerateOptions {
                path: file,
                format,
                users,
                first_user,
                seed,
                source,
                surfaces,
                features,
                producer,
                origin_app,
                now_unix_micros: i64::try_from(
                    SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros(),
                )?,
            };
            let rows = generate(&options, &registry)?;
            writeln!(out, "wrote {rows} rows to {}", options.path.display())?;
        }
        Command::Stats { config } => {
            let stats = client.stats().await.map_err(call)?;
            print_stats(out, &stats)?;
            if config {
                writeln!(out)?;
                write!(out, "{}", stats.config)?;
            }
        }
        Command::Backup => {
            let backup = client.create_backup().await.map_err(call)?;
            writeln!(out, "backup written to {} on the server", backup.path)?;
        }
        Command::Sweep => {
            let report = client.sweep_expired().await.map_err(call)?;
            writeln!(
                out,
                "swept {} users, removed {} values",
                report.users_swept, report.values_removed
            )?;
        }
        Command::VerifyAudit => {
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
                        chain.partition,
                        chain.first_broken_sequence,
                        chain.problem,
                        chain.records_checked
                    )?;
                }
                return Ok(EXIT_AUDIT_BROKEN);
            }
        }
        Command::Policy => {
            let status = client.policy_status().await.map_err(call)?;
            print_policy_status(out, &status)?;
        }
        Command::ReloadPolicy => {
            let status = client.reload_policy().await.map_err(call)?;
            print_policy_status(out, &status)?;
        }
        Command::GetUser { user_id } => {
            let state = client.get_user_state(user_id).await.map_err(call)?;
            print_user_state(out, &state)?;
        }
        Command::Read {
            surface,
            users,
            keys,
            features,
            format,
        } => {
            let mut read_keys = Vec::new();
            if !users.is_empty() {
                let surface = surface.context("--user needs --surface")?;
                read_keys.extend(users.iter().map(|&user_id| ReadKey {
                    user_id,
                    surface: surface.clone(),
                }));
            }
            for key in &keys {
                let (user, surface) = key
                    .split_once(':')
                    .with_context(|| format!("--key {key:?} is not USER:SURFACE"))?;
                let user_id = user
                    .parse()
                    .with_context(|| format!("--key {key:?}: {user:?} is not a user id"))?;
                read_keys.push(ReadKey {
                    user_id,
                    surface: surface.to_string(),
                });
            }
            if read_keys.is_empty() {
                bail!("nothing to read: give --surface with --user, or --key USER:SURFACE");
            }
            let request = ReadRequest {
                keys: read_keys.clone(),
                features,
                include_event_times: true,
            };
            let response = client.get_features(request).await.map_err(call)?;
            let rows = read_rows_json(&read_keys, &response);
            match format {
                Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?,
                Format::Table => print_read_table(out, &response, &rows)?,
            }
        }
    }
    Ok(EXIT_SUCCESS)
}

/// The text of `file`, or of standard input when it is absent or "-".
fn read_input(file: Option<&str>) -> anyhow::Result<String> {
    match file {
        None | Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            Ok(text)
        }
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {path}")),
    }
}

fn print_receipt(out: &mut dyn Write, receipt: &proto::ErasureReceipt) -> std::io::Result<()> {
    let mut rows = vec![
        vec!["receipt".to_string(), receipt.receipt_id.clone()],
        vec!["user".to_string(), receipt.user_id.to_string()],
        vec![
            "requested".to_string(),
            format_time_micros(receipt.requested_at_unix_micros),
        ],
        vec![
            "fenced".to_string(),
            format_time_micros(receipt.fenced_at_unix_micros),
        ],
        vec![
            "deleted".to_string(),
            format_time_micros(receipt.deleted_at_unix_micros),
        ],
        vec![
            "compacted".to_string(),
            format_time_micros(receipt.compacted_at_unix_micros),
        ],
        vec![
            "verified".to_string(),
            format_time_micros(receipt.verified_at_unix_micros),
        ],
        vec![
            "result".to_string(),
            if receipt.verified {
                "nothing left".to_string()
            } else {
                "NOT VERIFIED".to_string()
            },
        ],
    ];
    for reapplied in &receipt.reapplied_at_unix_micros {
        rows.push(vec![
            "reapplied".to_string(),
            format_time_micros(*reapplied),
        ]);
    }
    print_table(out, &["step", "finished"], &rows)
}

/// A time with its microseconds, for steps that finish within a second of each other.
fn format_time_micros(micros: i64) -> String {
    match u64::try_from(micros) {
        Ok(micros) if micros > 0 => {
            humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
        }
        _ => "-".to_string(),
    }
}

fn print_stats(out: &mut dyn Write, stats: &proto::StoreStats) -> std::io::Result<()> {
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

fn print_policy_status(out: &mut dyn Write, status: &proto::PolicyStatus) -> std::io::Result<()> {
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

fn print_user_state(out: &mut dyn Write, state: &proto::UserState) -> std::io::Result<()> {
    let age = proto::AgeBand::try_from(state.age_band).map_or("?".to_string(), |band| {
        enum_name(band.as_str_name(), "AGE_BAND_")
    });
    let erasure = proto::ErasureState::try_from(state.erasure_state)
        .map_or("?".to_string(), |erasure| {
            enum_name(erasure.as_str_name(), "ERASURE_STATE_")
        });
    let jurisdiction = if state.jurisdiction.is_empty() {
        "(unknown)"
    } else {
        &state.jurisdiction
    };
    let rows = vec![
        vec!["user".to_string(), state.user_id.to_string()],
        vec![
            "jurisdiction".to_string(),
            format!("{jurisdiction} ({})", state.jurisdiction_group),
        ],
        vec!["age_band".to_string(), age],
        vec!["linked_apps".to_string(), state.linked_apps.join(",")],
        vec!["ads_objection".to_string(), state.ads_objection.to_string()],
        vec!["erasure".to_string(), erasure],
        vec!["generation".to_string(), state.generation.to_string()],
        vec![
            "updated_at".to_string(),
            format_time(state.updated_at_unix_micros),
        ],
    ];
    print_table(out, &["field", "value"], &rows)
}

fn type_name(value_type: i32, dimension: u32) -> String {
    match proto::ValueType::try_from(value_type) {
        Ok(proto::ValueType::Float) => "float".to_string(),
        Ok(proto::ValueType::Int64) => "int64".to_string(),
        Ok(proto::ValueType::String) => "string".to_string(),
        Ok(proto::ValueType::FloatVector) => format!("float_vector[{dimension}]"),
        Ok(proto::ValueType::Sparse) => "sparse".to_string(),
        Ok(proto::ValueType::Unspecified) | Err(_) => "?".to_string(),
    }
}

fn sensitivity_name(sensitivity: i32) -> String {
    proto::SensitivityClass::try_from(sensitivity)
        .map(|class| {
            class
                .as_str_name()
                .trim_start_matches("SENSITIVITY_CLASS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "?".to_string())
}

/// A TTL in whole days when it is one, else as humantime prints it.
fn format_ttl(seconds: u64) -> String {
    const DAY: u64 = 24 * 60 * 60;
    if seconds > 0 && seconds.is_multiple_of(DAY) {
        format!("{}d", seconds / DAY)
    } else {
        humantime::format_duration(Duration::from_secs(seconds)).to_string()
    }
}

/// A float as JSON, printed with the shortest digits that read back as the same `f32`.
fn float_json(number: f32) -> Json {
    number
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Json::Null, Json::Number)
}

fn enum_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

/// Builds a write request from the CLI's JSON format, typing each value by the registry.
fn write_request_from_json(
    text: &str,
    features: &[proto::FeatureDefinition],
) -> anyhow::Result<proto::WriteFeaturesRequest> {
    let document: Json = serde_json::from_str(text).context("the input is not valid JSON")?;
    let (idempotency_key, rows) = match &document {
        Json::Array(rows) => (None, rows.as_slice()),
        Json::Object(object) if object.contains_key("rows") => (
            object
                .get("idempotency_key")
                .and_then(Json::as_str)
                .map(str::to_string),
            object["rows"]
                .as_array()
                .map(Vec::as_slice)
                .context("\"rows\" must be an array")?,
        ),
        Json::Object(_) => (None, std::slice::from_ref(&document)),
        _ => bail!("the input must be a row object, an array of rows, or {{\"rows\": [...]}}"),
    };
    let types: HashMap<&str, &proto::FeatureDefinition> = features
        .iter()
        .map(|feature| (feature.name.as_str(), feature))
        .collect();
    let rows = rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            write_row_from_json(row, &types).with_context(|| format!("rows[{index}]"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let idempotency_key = idempotency_key.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        format!("cli-{}-{nanos}", std::process::id())
    });
    Ok(proto::WriteFeaturesRequest {
        idempotency_key,
        rows,
    })
}

fn write_row_from_json(
    row: &Json,
    types: &HashMap<&str, &proto::FeatureDefinition>,
) -> anyhow::Result<proto::WriteRow> {
    let row = row.as_object().context("a row must be an object")?;
    let text = |field: &str| -> anyhow::Result<String> {
        row.get(field)
            .and_then(Json::as_str)
            .map(str::to_string)
            .with_context(|| format!("\"{field}\" must be a string"))
    };
    let user_id = row
        .get("user_id")
        .and_then(Json::as_u64)
        .context("\"user_id\" must be a positive integer")?;
    let surfaces = row
        .get("surfaces")
        .and_then(Json::as_array)
        .context("\"surfaces\" must be an array of surface names")?
        .iter()
        .map(|surface| {
            surface
                .as_str()
                .map(str::to_string)
                .context("surface names are strings")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let interaction_time = match row.get("interaction_time") {
        None => SystemTime::now(),
        Some(Json::String(text)) => humantime::parse_rfc3339_weak(text)
            .with_context(|| format!("\"interaction_time\" {text:?} is not an RFC 3339 time"))?,
        Some(_) => {
            bail!("\"interaction_time\" must be an RFC 3339 time such as \"2026-01-05T10:00:00Z\"")
        }
    };
    let interaction_time_unix_micros = interaction_time
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|since| i64::try_from(since.as_micros()).ok())
        .context("\"interaction_time\" must be after 1970")?;
    let features = row
        .get("features")
        .and_then(Json::as_object)
        .context("\"features\" must be an object of name: value")?
        .iter()
        .map(|(name, value)| {
            feature_from_json(name, value, types).with_context(|| format!("feature {name:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(proto::WriteRow {
        user_id,
        target_surfaces: surfaces,
        provenance: Some(proto::Provenance {
            source: text("source")?,
            origin_app: text("origin_app")?,
            interaction_time_unix_micros,
            producer_id: row
                .get("producer_id")
                .and_then(Json::as_str)
                .unwrap_or("featurestore-cli")
                .to_string(),
            microphone_permission_granted: row
                .get("microphone_permission_granted")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        }),
        features,
        user_state_generation: row
            .get("user_state_generation")
            .and_then(Json::as_u64)
            .unwrap_or(0),
    })
}

/// A feature is `name: value`, or `name: {"value": ..., "topic_id", "topic_confidence",
/// "ttl_seconds"}`.
fn feature_from_json(
    name: &str,
    value: &Json,
    types: &HashMap<&str, &proto::FeatureDefinition>,
) -> anyhow::Result<proto::FeatureValue> {
    use proto::feature_value::Value as Wire;
    let definition = types
        .get(name)
        .with_context(|| "is not registered (see `featurestore features`)".to_string())?;
    let (value, details) = match value {
        Json::Object(object) if object.contains_key("value") => (&object["value"], Some(object)),
        other => (other, None),
    };
    let value_type =
        proto::ValueType::try_from(definition.value_type).unwrap_or(proto::ValueType::Unspecified);
    let as_f32 = |value: &Json| value.as_f64().map(|number| number as f32);
    let wire = match value_type {
        proto::ValueType::Float => as_f32(value).map(Wire::FloatValue),
        proto::ValueType::Int64 => value.as_i64().map(Wire::Int64Value),
        proto::ValueType::String => value
            .as_str()
            .map(|text| Wire::StringValue(text.to_string())),
        proto::ValueType::FloatVector => value
            .as_array()
            .and_then(|elements| elements.iter().map(as_f32).collect::<Option<Vec<_>>>())
            .map(|values| Wire::VectorValue(proto::FloatVector { values })),
        proto::ValueType::Sparse => value
            .as_object()
            .and_then(|entries| {
                entries
                    .iter()
                    .map(|(topic, weight)| as_f32(weight).map(|weight| (topic.clone(), weight)))
                    .collect::<Option<Vec<_>>>()
            })
            .map(|entries| {
                let (topics, weights) = entries.into_iter().unzip();
                Wire::SparseValue(proto::SparseVector { topics, weights })
            }),
        proto::ValueType::Unspecified => None,
    }
    .with_context(|| {
        format!(
            "the value is not a {}",
            type_name(definition.value_type, definition.dimension)
        )
    })?;
    let detail = |field: &str| details.and_then(|object: &Map<String, Json>| object.get(field));
    Ok(proto::FeatureValue {
        name: name.to_string(),
        value: Some(wire),
        topic_id: detail("topic_id")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string(),
        topic_confidence: detail("topic_confidence").and_then(as_f32),
        ttl_seconds: detail("ttl_seconds").and_then(Json::as_u64).unwrap_or(0),
    })
}

fn format_time(micros: i64) -> String {
    let Ok(micros) = u64::try_from(micros) else {
        return "-".to_string();
    };
    if micros == 0 {
        return "-".to_string();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
}

/// Prints one line per (row, feature) and returns 3 when any value was refused.
fn print_write(
    out: &mut dyn Write,
    request: &proto::WriteFeaturesRequest,
    response: &proto::WriteFeaturesResponse,
) -> std::io::Result<u8> {
    let mut refused = false;
    let mut lines = Vec::new();
    for (row, result) in request.rows.iter().zip(&response.rows) {
        for verdict in &result.verdicts {
            let verdict_name = proto::Verdict::try_from(verdict.verdict)
                .map_or("?".to_string(), |verdict| {
                    enum_name(verdict.as_str_name(), "VERDICT_")
                });
            refused |= verdict.verdict != proto::Verdict::Allow as i32;
            let surfaces = verdict
                .surfaces
                .iter()
                .map(|surface| {
                    let outcome = proto::Outcome::try_from(surface.outcome)
                        .map_or("?".to_string(), |outcome| {
                            enum_name(outcome.as_str_name(), "OUTCOME_")
                        });
                    let reasons = surface
                        .reasons
                        .iter()
                        .map(|&reason| reason_label(reason))
                        .collect::<Vec<_>>();
                    if reasons.is_empty() {
                        format!("{}={outcome}", surface.surface)
                    } else {
                        format!("{}={outcome}({})", surface.surface, reasons.join(","))
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            lines.push(vec![
                row.user_id.to_string(),
                verdict.feature.clone(),
                verdict_name,
                format_time(verdict.expires_at_unix_micros),
                surfaces,
            ]);
        }
    }
    if response.replayed {
        writeln!(
            out,
            "replayed: a write with this idempotency key was already applied; nothing changed"
        )?;
    }
    print_table(
        out,
        &["user", "feature", "verdict", "expires_at", "surfaces"],
        &lines,
    )?;
    Ok(if refused { EXIT_REFUSED } else { EXIT_SUCCESS })
}

/// The response as JSON objects, one per key.
fn read_rows_json(keys: &[ReadKey], response: &proto::GetFeaturesResponse) -> Vec<Json> {
    keys.iter()
        .zip(&response.rows)
        .map(|(key, row)| {
            let status = proto::RowStatus::try_from(row.status)
                .map_or("?".to_string(), |status| enum_name(status.as_str_name(), "ROW_STATUS_"));
            let mut features = Map::new();
            for (index, column) in response.columns.iter().enumerate() {
                let Some(&value_status) = row.statuses.get(index) else { continue };
                let value_status = proto::ValueStatus::try_from(value_status)
                    .map_or("?".to_string(), |status| enum_name(status.as_str_name(), "VALUE_STATUS_"));
                let mut cell = Map::new();
                cell.insert("status".to_string(), json!(value_status));
                if value_status == "present" || value_status == "defaulted" {
                    cell.insert("value".to_string(), cell_value(column, row));
                }
                if let Some(&event_time) = row.event_times_unix_micros.get(index).filter(|&&time| time != 0) {
                    cell.insert("event_time".to_string(), json!(format_time(event_time)));
                }
                features.insert(column.name.clone(), Json::Object(cell));
            }
            json!({"user_id": key.user_id, "surface": key.surface, "status": status, "features": features})
        })
        .collect()
}

fn cell_value(column: &proto::FeatureColumn, row: &proto::FeatureRow) -> Json {
    let offset = column.offset as usize;
    match proto::ValueType::try_from(column.value_type) {
        Ok(proto::ValueType::Float) => row
            .float_values
            .get(offset)
            .map_or(Json::Null, |&number| float_json(number)),
        Ok(proto::ValueType::FloatVector) => row
            .float_values
            .get(offset..offset + column.dimension as usize)
            .map_or(Json::Null, |elements| {
                elements.iter().map(|&number| float_json(number)).collect()
            }),
        Ok(proto::ValueType::Int64) => json!(row.int64_values.get(offset)),
        Ok(proto::ValueType::String) => json!(row.string_values.get(offset)),
        Ok(proto::ValueType::Sparse) => {
            row.sparse_values.get(offset).map_or(Json::Null, |sparse| {
                Json::Object(
                    sparse
                        .topics
                        .iter()
                        .zip(&sparse.weights)
                        .map(|(topic, weight)| (topic.clone(), float_json(*weight)))
                        .collect(),
                )
            })
        }
        Ok(proto::ValueType::Unspecified) | Err(_) => Json::Null,
    }
}

fn print_read_table(
    out: &mut dyn Write,
    response: &proto::GetFeaturesResponse,
    rows: &[Json],
) -> std::io::Result<()> {
    let mut header = vec!["user", "surface", "row"];
    header.extend(response.columns.iter().map(|column| column.name.as_str()));
    let lines = rows
        .iter()
        .map(|row| {
            let mut line = vec![
                row["user_id"].to_string(),
                row["surface"].as_str().unwrap_or("").to_string(),
            ];
            line.push(row["status"].as_str().unwrap_or("").to_string());
            for column in &response.columns {
                let cell = &row["features"][&column.name];
                let status = cell["status"].as_str().unwrap_or("");
                line.push(match cell.get("value") {
                    Some(value) if status == "present" => value.to_string(),
                    Some(value) => format!("{value} ({status})"),
                    None => format!("({status})"),
                });
            }
            line
        })
        .collect::<Vec<_>>();
    print_table(out, &header, &lines)
}

/// A reason code's name without its prefix, e.g. "USER_ERASED".
fn reason_label(reason: i32) -> String {
    proto::ReasonCode::try_from(reason).map_or_else(
        |_| format!("reason {reason}"),
        |reason| {
            reason
                .as_str_name()
                .trim_start_matches("REASON_CODE_")
                .to_string()
        },
    )
}

fn print_load_job(out: &mut dyn Write, job: &proto::LoadJob) -> std::io::Result<()> {
    let state = proto::LoadJobState::try_from(job.state).map_or("?".to_string(), |state| {
        enum_name(state.as_str_name(), "LOAD_JOB_STATE_")
    });
    writeln!(
        out,
        "job {}: {state}, {} chunks durable{}",
        job.job_id,
        job.last_durable_chunk,
        if job.state == proto::LoadJobState::Committed as i32 {
            format!(", {} table files ingested", job.files_ingested)
        } else {
            String::new()
        }
    )?;
    let summary = job.summary.clone().unwrap_or_default();
    let counts = [
        ("rows received", summary.rows_received),
        ("  accepted", summary.rows_accepted),
        ("  transformed", summary.rows_transformed),
        ("  denied", summary.rows_denied),
        ("  invalid", summary.rows_invalid),
        ("values admitted", summary.values_admitted),
        ("values refused", summary.values_refused),
    ];
    let rows: Vec<Vec<String>> = counts
        .iter()
        .map(|(name, count)| vec![name.to_string(), count.to_string()])
        .collect();
    print_table(out, &["", "count"], &rows)?;
    if !summary.reasons.is_empty() {
        writeln!(out)?;
        let rows: Vec<Vec<String>> = summary
            .reasons
            .iter()
            .map(|count| {
                vec![
                    reason_label(count.reason),
                    count.rows.to_string(),
                    count.values.to_string(),
                ]
            })
            .collect();
        print_table(out, &["refused by", "rows", "values"], &rows)?;
    }
    Ok(())
}

fn print_table<S: AsRef<str>>(
    out: &mut dyn Write,
    header: &[S],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|title| title.as_ref().len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.iter().map(AsRef::as_ref).collect()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
