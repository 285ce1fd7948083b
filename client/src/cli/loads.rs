//! The bulk-load commands: load a file (resumable), follow, abort and list jobs, and
//! generate backfill files.

use super::*;

#[derive(Debug, Subcommand)]
pub(super) enum LoadsCommand {
    /// Bulk-load a JSON Lines, CSV or Parquet file (see docs/bulk-loads.md for its columns) into
    /// a job, with progress on stderr, and commit it. Re-run with the same --job to resume
    /// an interrupted load. Prints the summary; exits with 3 when any row was refused,
    /// transformed or malformed.
    Load(LoadArgs),
    /// Show a bulk-load job and its summary.
    LoadStatus { job: String },
    /// Abort an open bulk-load job: none of its rows is applied.
    LoadAbort { job: String },
    /// List recent bulk-load jobs.
    LoadJobs(LoadJobsArgs),
    /// Write a realistic backfill file (one row per user) for the server's registered
    /// features, to try `load` or to benchmark it.
    Generate(GenerateArgs),
}

/// Runs one of these commands.
pub(super) async fn run(
    command: LoadsCommand,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    match command {
        LoadsCommand::Load(args) => load_file(args, client, out).await,
        LoadsCommand::LoadStatus { job } => {
            let job = client.load_job(&job).await.map_err(call)?;
            print_load_job(out, &job)?;
            Ok(EXIT_SUCCESS)
        }
        LoadsCommand::LoadAbort { job } => {
            let job = client.abort_load(&job).await.map_err(call)?;
            print_load_job(out, &job)?;
            Ok(EXIT_SUCCESS)
        }
        LoadsCommand::LoadJobs(args) => load_jobs(args, client, call, out).await,
        LoadsCommand::Generate(args) => generate_file(args, client, call, out).await,
    }
}

#[derive(Debug, clap::Args)]
pub(super) struct LoadArgs {
    pub(super) file: PathBuf,
    /// Job id: letters, digits, '.', '_', '-'.
    #[arg(long)]
    pub(super) job: String,
    /// The file's format; from its extension (.jsonl, .csv, .parquet) when absent.
    #[arg(long, value_enum)]
    pub(super) format: Option<FileFormat>,
    /// Rows per chunk; a resumed job must use the size it started with.
    #[arg(long, default_value_t = 4096)]
    pub(super) chunk_rows: usize,
    /// Chunks sent ahead of their acknowledgement.
    #[arg(long, default_value_t = 4)]
    pub(super) in_flight: usize,
    /// Stop at the first malformed record instead of reporting it and going on.
    #[arg(long)]
    pub(super) strict: bool,
    /// Leave the job open after the last chunk instead of committing it.
    #[arg(long)]
    pub(super) no_commit: bool,
    /// Producer id of rows without a producer_id column.
    #[arg(long)]
    pub(super) producer: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub(super) quiet: bool,
}

#[derive(Debug, clap::Args)]
pub(super) struct LoadJobsArgs {
    #[arg(long, default_value_t = 20)]
    pub(super) limit: u32,
}

#[derive(Debug, clap::Args)]
pub(super) struct GenerateArgs {
    pub(super) file: PathBuf,
    /// Number of users (rows).
    #[arg(long)]
    pub(super) users: u64,
    /// The format; from the extension when absent.
    #[arg(long, value_enum)]
    pub(super) format: Option<FileFormat>,
    /// Id of the first user.
    #[arg(long, default_value_t = 1)]
    pub(super) first_user: u64,
    #[arg(long, default_value_t = 1)]
    pub(super) seed: u64,
    /// Source of every row.
    #[arg(long, default_value = "ai_chat")]
    pub(super) source: String,
    /// Target surfaces of every row.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "facebook_feed,instagram_reels"
    )]
    pub(super) surfaces: Vec<String>,
    /// Features to fill (every feature the source may produce on the surfaces when
    /// absent).
    #[arg(long = "feature", value_delimiter = ',')]
    pub(super) features: Vec<String>,
    #[arg(long, default_value = "generator@v1")]
    pub(super) producer: String,
    /// App of every interaction (half facebook, half instagram when absent).
    #[arg(long)]
    pub(super) origin_app: Option<String>,
}

async fn load_file(args: LoadArgs, client: &Client, out: &mut dyn Write) -> anyhow::Result<u8> {
    let LoadArgs {
        file,
        job,
        format,
        chunk_rows,
        in_flight,
        strict,
        no_commit,
        producer,
        quiet,
    } = args;
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
    let report = load(client, &options).await?;
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
    if report.bad_lines + summary.rows_denied + summary.rows_transformed + summary.rows_invalid > 0
    {
        return Ok(EXIT_REFUSED);
    }
    Ok(EXIT_SUCCESS)
}

async fn load_jobs(
    args: LoadJobsArgs,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let LoadJobsArgs { limit } = args;
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
    Ok(EXIT_SUCCESS)
}

async fn generate_file(
    args: GenerateArgs,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let GenerateArgs {
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
    } = args;
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
        now_unix_micros: i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros())?,
    };
    let rows = generate(&options, &registry)?;
    writeln!(out, "wrote {rows} rows to {}", options.path.display())?;
    Ok(EXIT_SUCCESS)
}

pub(super) fn print_load_job(out: &mut dyn Write, job: &proto::LoadJob) -> std::io::Result<()> {
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
