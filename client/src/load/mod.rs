//! The bulk loader behind `featurestore load`: reads a JSON Lines, CSV or Parquet file on
//! a thread of its own, streams it to the server in numbered chunks with a few in flight,
//! shows progress, resumes an interrupted job where the server says it stands, and
//! reports malformed records by line number.

pub mod formats;
pub mod layout;

use std::collections::VecDeque;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use featurestore::proto;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::Code;

use crate::{Client, ClientError};
use formats::{FileFormat, Item};

/// Malformed records kept for the report; all are counted.
const BAD_LINES_KEPT_MAX: usize = 20;

/// What to load, and how.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub path: PathBuf,
    /// The file's format; from its extension when `None`.
    pub format: Option<FileFormat>,
    pub job_id: String,
    /// Rows per chunk. A resumed job must use the size it started with.
    pub chunk_rows: usize,
    /// Chunks sent and not yet acknowledged.
    pub chunks_in_flight: usize,
    /// Stop at the first malformed record instead of counting it and going on.
    pub strict: bool,
    /// Commit once every chunk is durable (otherwise the job stays open).
    pub commit: bool,
    /// Producer id of rows without a `producer_id` column.
    pub producer: Option<String>,
    /// Times a broken stream is re-attached and resumed.
    pub retries: u32,
    /// Draw a progress bar (on a terminal) or progress lines (otherwise) on stderr.
    pub progress: bool,
}

impl LoadOptions {
    pub fn new(path: impl Into<PathBuf>, job_id: impl Into<String>) -> LoadOptions {
        LoadOptions {
            path: path.into(),
            format: None,
            job_id: job_id.into(),
            chunk_rows: 4096,
            chunks_in_flight: 4,
            strict: false,
            commit: true,
            producer: None,
            retries: 5,
            progress: false,
        }
    }
}

/// What a load did.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// The job as the server has it at the end (committed unless `commit` was off).
    pub job: proto::LoadJob,
    /// Records read from the file (rows and malformed ones).
    pub records: u64,
    /// Malformed records found by the loader (never sent).
    pub bad_lines: u64,
    /// The first malformed records, found by the loader or the server: (line, problem).
    pub bad_line_examples: Vec<(u64, String)>,
    /// The last chunk that was already durable when the load started (0: a new job).
    pub resumed_after_chunk: u64,
    /// Chunks this run sent.
    pub chunks_sent: u64,
    /// The job was already committed; nothing was sent.
    pub already_committed: bool,
    pub elapsed: Duration,
    pub commit_elapsed: Duration,
}

/// A chunk as the reader thread hands it over.
struct Chunk {
    rows: Vec<proto::WriteRow>,
    lines: Vec<u64>,
    bad: Vec<(u64, String)>,
    progress: (u64, u64),
}

enum Failure {
    /// The stream broke in a way a new stream may get past.
    Retryable(ClientError),
    Fatal(anyhow::Error),
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        match error.code() {
            Code::Unavailable | Code::Aborted | Code::Cancelled | Code::Unknown => {
                Failure::Retryable(error)
            }
            _ => Failure::Fatal(error.into()),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Fatal(error)
    }
}

/// Identifies the input of a job so that a resume from another file, format or chunk
/// size is refused by the server.
fn fingerprint(path: &Path, format: FileFormat, chunk_rows: usize) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut head = Vec::with_capacity(1 << 20);
    file.by_ref().take(1 << 20).read_to_end(&mut head)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(format!(
        "{name} {format:?} {size} bytes head-crc32 {:08x} chunks of {chunk_rows} rows",
        crc32fast::hash(&head)
    ))
}

/// Loads a file into a job, resuming it when it exists.
pub async fn load(client: &Client, options: &LoadOptions) -> anyhow::Result<LoadReport> {
    if options.chunk_rows == 0 || options.chunks_in_flight == 0 {
        bail!("chunk rows and chunks in flight must be at least 1");
    }
    let format = match options.format {
        Some(format) => format,
        None => FileFormat::of_path(&options.path).with_context(|| {
            format!(
                "cannot tell the format of {} from its extension: give --format",
                options.path.display()
            )
        })?,
    };
    let fingerprint = fingerprint(&options.path, format, options.chunk_rows)?;
    let features = client
        .list_features()
        .await
        .context("cannot list the registered features")?;
    // The file is checked against the registry before anything is sent.
    formats::open(
        &options.path,
        format,
        &features,
        options.producer.as_deref(),
    )?;
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        match attempt_load(client, options, format, &features, &fingerprint, started).await {
            Ok(report) => return Ok(report),
            Err(Failure::Retryable(error)) if attempt < options.retries => {
                attempt += 1;
                let wait = Duration::from_millis(200 << attempt.min(5));
                eprintln!(
                    "the bulk-load stream broke ({error}); resuming in {} ms",
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
            }
            Err(Failure::Retryable(error)) => return Err(error.into()),
            Err(Failure::Fatal(error)) => return Err(error),
        }
    }
}

async fn attempt_load(
    client: &Client,
    options: &LoadOptions,
    format: FileFormat,
    features: &[proto::FeatureDefinition],
    fingerprint: &str,
    started: Instant,
) -> Result<LoadReport, Failure> {
    let mut session = client.start_load(&options.job_id, fingerprint).await?;
    let resumed_after_chunk = session.job.last_durable_chunk;
    let mut report = LoadReport {
        job: session.job.clone(),
        records: 0,
        bad_lines: 0,
        bad_line_examples: Vec::new(),
        resumed_after_chunk,
        chunks_sent: 0,
        already_committed: false,
        elapsed: Duration::ZERO,
        commit_elapsed: Duration::ZERO,
    };
    match session.job.state() {
        proto::LoadJobState::Committed => {
            report.already_committed = true;
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        proto::LoadJobState::Aborted => {
            return Err(anyhow!("job {:?} was aborted; use another job id", options.job_id).into());
        }
        _ => {}
    }
    let mut chunks = read_chunks(
        options.path.clone(),
        format,
        features.to_vec(),
        options.producer.clone(),
        options.chunk_rows,
    );
    let progress = Progress::new(options.progress);
    let mut in_flight: VecDeque<(u64, Vec<u64>)> = VecDeque::new();
    let mut sequence = 0u64;
    let mut rows_sent = 0u64;
    while let Some(chunk) = chunks.recv().await {
        let chunk = chunk?;
        report.records += (chunk.rows.len() + chunk.bad.len()) as u64;
        report.bad_lines += chunk.bad.len() as u64;
        if let Some((line, problem)) = chunk.bad.first()
            && options.strict
        {
            return Err(anyhow!("line {line}: {problem} (stopped by --strict)").into());
        }
        for bad in chunk.bad {
            keep_example(&mut report.bad_line_examples, bad);
        }
        if chunk.rows.is_empty() {
            continue;
        }
        sequence += 1;
        if sequence > resumed_after_chunk {
            rows_sent += chunk.rows.len() as u64;
            session.send_chunk(sequence, chunk.rows).await?;
            report.chunks_sent += 1;
            in_flight.push_back((sequence, chunk.lines));
            while in_flight.len() >= options.chunks_in_flight {
                acknowledged(
                    session.next_ack().await?,
                    &mut in_flight,
                    &mut report,
                    options,
                )?;
            }
        }
        progress.update(chunk.progress, report.records, started);
    }
    while !in_flight.is_empty() {
        acknowledged(
            session.next_ack().await?,
            &mut in_flight,
            &mut report,
            options,
        )?;
    }
    progress.finish(report.records, started);
    tracing::debug!(rows_sent, "every chunk is durable");
    let commit_started = Instant::now();
    report.job = if options.commit {
        session.commit().await?
    } else {
        drop(session);
        client.load_job(&options.job_id).await?
    };
    report.commit_elapsed = commit_started.elapsed();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Takes an acknowledgement of the oldest chunk in flight, mapping the server's
/// malformed rows to line numbers.
fn acknowledged(
    ack: proto::ChunkAck,
    in_flight: &mut VecDeque<(u64, Vec<u64>)>,
    report: &mut LoadReport,
    options: &LoadOptions,
) -> Result<(), Failure> {
    let Some((sequence, lines)) = in_flight.pop_front() else {
        return Err(anyhow!("an acknowledgement of chunk {} nobody sent", ack.sequence).into());
    };
    if ack.sequence != sequence {
        return Err(anyhow!(
            "chunk {} was acknowledged while {sequence} was expected",
            ack.sequence
        )
        .into());
    }
    for invalid in ack.invalid_rows {
        let line = lines.get(invalid.row as usize).copied().unwrap_or(0);
        let problem = format!("{}: {}", invalid.field, invalid.problem);
        if options.strict {
            return Err(anyhow!("line {line}: {problem} (stopped by --strict)").into());
        }
        keep_example(&mut report.bad_line_examples, (line, problem));
    }
    Ok(())
}

fn keep_example(examples: &mut Vec<(u64, String)>, bad: (u64, String)) {
    if examples.len() < BAD_LINES_KEPT_MAX {
        examples.push(bad);
    }
}

/// Reads the file on a thread of its own, in chunks of `chunk_rows` well-formed rows;
/// malformed records travel with the chunk they were found in.
fn read_chunks(
    path: PathBuf,
    format: FileFormat,
    features: Vec<proto::FeatureDefinition>,
    producer: Option<String>,
    chunk_rows: usize,
) -> tokio::sync::mpsc::Receiver<anyhow::Result<Chunk>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        let mut source = match formats::open(&path, format, &features, producer.as_deref()) {
            Ok(source) => source,
            Err(error) => {
                let _ = sender.blocking_send(Err(error));
                return;
            }
        };
        let mut items = Vec::with_capacity(chunk_rows);
        let mut more = true;
        while more {
            let mut chunk = Chunk {
                rows: Vec::with_capacity(chunk_rows),
                lines: Vec::with_capacity(chunk_rows),
                bad: Vec::new(),
                progress: (0, 0),
            };
            while more && chunk.rows.len() < chunk_rows {
                items.clear();
                more = match source.read(chunk_rows - chunk.rows.len(), &mut items) {
                    Ok(more) => more,
                    Err(error) => {
                        let _ = sender.blocking_send(Err(error));
                        return;
                    }
                };
                for item in items.drain(..) {
                    match item {
                        Item::Row { line, row } => {
                            chunk.rows.push(row);
                            chunk.lines.push(line);
                        }
                        Item::Bad { line, problem } => chunk.bad.push((line, problem)),
                    }
                }
            }
            chunk.progress = source.progress();
            if sender.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Progress on stderr: a bar on a terminal, a line every few seconds otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    last_line: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (enabled && terminal).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{wide_bar}] {percent:>3}% {msg} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            lines: enabled && !terminal,
            last_line: std::cell::Cell::new(None),
        }
    }

    fn update(&self, (done, total): (u64, u64), records: u64, started: Instant) {
        let rate = records as f64 / started.elapsed().as_secs_f64().max(1e-3);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(format!("{records} rows, {rate:.0} rows/s"));
        } else if self.lines
            && self
                .last_line
                .get()
                .is_none_or(|last| last.elapsed() >= Duration::from_secs(5))
        {
            self.last_line.set(Some(Instant::now()));
            let percent = if total == 0 {
                0.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            eprintln!("loaded {records} rows ({percent:.0}%), {rate:.0} rows/s");
        }
    }

    fn finish(&self, records: u64, started: Instant) {
        let rate = records as f64 / started.elapsed().as_secs_f64().max(1e-3);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.bar.is_some() || self.lines {
            eprintln!("sent {records} rows, {rate:.0} rows/s; committing");
        }
    }
}
